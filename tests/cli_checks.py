"""Shared checks of the command lines' error contract: exit status 2 and one line on stderr, no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def assert_one_line_error(code: int | None, err: str, fragment: str, *, status: int = 2) -> str:
    """``err`` is one line holding ``fragment``, no traceback, and the exit status is ``status``; returns the line."""
    lines = err.strip().splitlines()
    assert code == status, (code, err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert fragment in lines[0], err
    return lines[0]


def gen_without_a_weight(gen_dir: Path, tmp_path: Path, drop: str = "model.norm.weight") -> Path:
    """A copy of the Gen checkpoint missing one weight: transformers prints its LOAD REPORT table for it."""
    path = Path(shutil.copytree(gen_dir, tmp_path / "gen-missing-weight"))
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
