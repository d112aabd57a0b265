"""examples/langchain_chain.py runs as written against the offline test checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from guard_core.testing.stream_fixture import stream_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_langchain_example_runs_and_guards(gen_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "QWEN3GUARD_STREAM_PATH": str(stream_checkpoint("planted"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "langchain_chain.py"), "--gen-model", str(gen_dir)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["callback, safe answer"].startswith("delivered 'Preheat the oven")
    assert lines["callback, unsafe answer"].startswith("stopped after 'Sure, take a pipe ': response blocked")
    assert lines["callback, unsafe question"].startswith("stopped after '': prompt blocked")
    assert lines["runnable, safe answer"].startswith("delivered 'Preheat the oven")
    assert lines["runnable, unsafe answer (replaced)"] == "delivered \"Sure, take aI'm sorry, but I can't help with that.\""
    assert lines["runnable, unsafe question"].startswith("stopped after '': prompt blocked")
