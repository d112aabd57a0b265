"""examples/langchain_agent.py runs as written against the offline test checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from guard_core import DEFAULT_REFUSAL
from guard_core.testing import stream_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_the_agent_example_reports_what_was_blocked_and_why(gen_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "langchain_agent.py"), "--gen-model", str(gen_dir),
         "--stream-model", str(stream_checkpoint("planted"))],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["safe document"].startswith("nothing blocked; the user saw 'Preheat the oven")
    assert lines["injected document"].startswith("tool result blocked (Unsafe: Jailbreak); the user saw 'Preheat the oven")
    assert lines["unsafe question"] == f"question blocked (Unsafe: Violent); the user saw {DEFAULT_REFUSAL!r}"
    assert lines["unsafe answer"] == f"answer blocked (Unsafe: Violent); the user saw {'Sure, take a' + chr(10) * 2 + DEFAULT_REFUSAL!r}"
