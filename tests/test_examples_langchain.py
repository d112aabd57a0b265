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
           "QWEN3GUARD_STREAM_MODEL": str(stream_checkpoint("planted"))}
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
    # The refusal is set apart from the text already delivered.
    assert lines["runnable, unsafe answer (replaced)"] == "delivered \"Sure, take a\\n\\nI'm sorry, but I can't help with that.\""
    assert lines["runnable, unsafe question"].startswith("stopped after '': prompt blocked")
    assert lines["around, safe answer"].startswith("delivered 'Preheat the oven")
    assert lines["around, unsafe answer"].startswith("stopped after 'Sure, take a': response blocked")
    assert lines["around, unsafe question"].startswith("stopped after '': prompt blocked")


def test_langchain_example_says_in_one_line_when_a_model_cannot_be_loaded() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "langchain_chain.py"), "--gen-model", "./no-such-dir"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines() if "no-such-dir" in line]
