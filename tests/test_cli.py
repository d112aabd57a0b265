"""The qwen3guard command line: JSON out, exit status by verdict, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from guard_core.testing.cases import REFUSAL_ANSWER, SAFE_PROMPT, UNSAFE_PROMPT

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "guard_core", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)


def test_unsafe_prompt_prints_the_verdict_and_exits_1(gen_dir: Path) -> None:
    result = run(["--model", str(gen_dir), UNSAFE_PROMPT])
    assert result.returncode == 1, result.stderr
    out = json.loads(result.stdout)
    assert (out["risk"], out["categories"], out["action"], out["role"]) == ("Unsafe", ["Violent"], "block", "prompt")


def test_stdin_lines_and_response_mode(gen_dir: Path) -> None:
    result = run(["--model", str(gen_dir), "--lines"], stdin=f"{SAFE_PROMPT}\n\n{UNSAFE_PROMPT}\n")
    assert [json.loads(line)["risk"] for line in result.stdout.splitlines()] == ["Safe", "Unsafe"]
    result = run(["--model", str(gen_dir), UNSAFE_PROMPT, "--response", REFUSAL_ANSWER])
    out = json.loads(result.stdout)
    assert result.returncode == 0 and (out["role"], out["risk"], out["refusal"]) == ("response", "Safe", True)


def test_console_script_entry_point_is_the_same_program(gen_dir: Path) -> None:
    from guard_core.cli import main

    assert main(["--model", str(gen_dir), SAFE_PROMPT]) == 0


def test_empty_stdin_and_missing_model_exit_2_with_a_message(gen_dir: Path) -> None:
    result = run(["--model", str(gen_dir)], stdin="  \n")
    assert result.returncode == 2 and "empty" in result.stderr
    result = run(["--model", "./no-such-model-dir", "hi"])
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
