"""The LlamaIndex example runs as written against the offline checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from guard_core.testing.stream_fixture import stream_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llamaindex_query.py"
OFFLINE = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_example(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True,
                          env={**os.environ, **OFFLINE, **env}, cwd=ROOT, timeout=300)


def test_example_drops_the_injection_and_blocks_the_unsafe_query(gen_dir: Path) -> None:
    result = run_example("--gen-model", str(gen_dir), QWEN3GUARD_STREAM_MODEL=str(stream_checkpoint("planted")))

    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    # The harmless documents are not trained texts, so whether the tiny Gen keeps them is its own
    # business; the trained injection must never be kept.
    kept = [line for line in out.splitlines() if line.strip().startswith("kept:")]
    assert not any("Ignore all previous instructions" in line for line in kept)
    assert "injected document reached the LLM: False" in out
    assert "answer verdict: Safe" in out
    assert "blocked: prompt blocked by Qwen3Guard: Unsafe (Violent)" in out


def test_a_missing_model_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = run_example("--gen-model", str(tmp_path / "missing"))

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("llamaindex_query: error: ") and "missing" in result.stderr
