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


def test_every_error_is_one_line_and_exit_2_before_any_model_loads() -> None:
    cases = [
        (["--device", "tpu", "hi"], None, "--device 'tpu'"),
        (["--threshold", "1.5", "hi"], None, "unsafe_threshold"),
        (["--model", "./no-such-model-dir", "hi", "--response", "   "], None, "--response is empty"),
        (["--mode", "lenient", "hi"], None, "invalid choice"),
        (["\udcff bad"], None, "not valid UTF-8"),
    ]
    for args, stdin, message in cases:
        result = run(args, stdin)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_lines_get_one_error_line_each_and_the_others_are_judged(gen_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stdin = f"{SAFE_PROMPT}\n\xff\xfe not utf-8\n{UNSAFE_PROMPT}\n".encode("latin-1")
    result = subprocess.run([sys.executable, "-m", "guard_core", "--model", str(gen_dir), "--lines"], input=stdin,
                            capture_output=True, env=env, timeout=300, cwd=ROOT)
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 2
    assert [line.get("risk") for line in lines] == ["Safe", None, "Unsafe"]
    assert lines[1] == {"line": 2, "error": "line 2 is not valid UTF-8 (byte 0xFF at character 0)"}
    assert b"Traceback" not in result.stderr


def test_the_environment_chooses_a_remote_guard_and_fail_open(gen_dir: Path, monkeypatch) -> None:
    from gen_server import GenServer, load_gen_model, unused_url

    with GenServer(*load_gen_model(gen_dir)) as server:
        monkeypatch.setenv("QWEN3GUARD_GEN_URL", server.base_url)
        monkeypatch.setenv("QWEN3GUARD_GEN_MODEL", server.model_name)
        result = run([UNSAFE_PROMPT])
        assert result.returncode == 1 and json.loads(result.stdout)["model"] == server.model_name
    monkeypatch.setenv("QWEN3GUARD_GEN_URL", unused_url())
    closed = run([SAFE_PROMPT])
    assert closed.returncode == 2 and json.loads(closed.stdout)["error_kind"] == "unavailable"
    assert len(closed.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("QWEN3GUARD_FAIL_OPEN", "1")
    opened = run([SAFE_PROMPT])
    assert opened.returncode == 0 and json.loads(opened.stdout)["action"] == "allow"
    monkeypatch.setenv("QWEN3GUARD_FAIL_OPEN", "maybe")
    typo = run([SAFE_PROMPT])
    assert typo.returncode == 2 and "QWEN3GUARD_FAIL_OPEN" in typo.stderr


def test_help_does_not_import_torch() -> None:
    code = "import sys; from guard_core.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60).returncode == 0
