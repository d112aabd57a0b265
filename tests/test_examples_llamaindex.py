"""The LlamaIndex example runs as written against the offline checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from guard_core.testing.stream_fixture import stream_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_example_drops_the_injection_and_blocks_the_unsafe_query(gen_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "QWEN3GUARD_STREAM_MODEL": str(stream_checkpoint("planted"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "llamaindex_query.py"), "--gen-model", str(gen_dir)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    kept = [line for line in out.splitlines() if line.strip().startswith("kept:")]
    assert kept and not any("Ignore all previous instructions" in line for line in kept)
    assert "injected document reached the LLM: False" in out
    assert "answer verdict: Safe" in out
    assert "blocked: prompt blocked by Qwen3Guard: Unsafe (Violent)" in out
