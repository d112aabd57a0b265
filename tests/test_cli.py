"""The qwen3guard command line: JSON out, exit status by verdict, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error, gen_without_a_weight

from guard_core.config import Settings
from guard_core.testing.cases import CONTROVERSIAL_PROMPT, REFUSAL_ANSWER, SAFE_PROMPT, UNSAFE_PROMPT

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
        (["--threshold", "1.5", "hi"], None, "--threshold: unsafe_threshold must be in (0, 1], got 1.5"),
        (["--threshold", "nan", "hi"], None, "--threshold: unsafe_threshold must be in (0, 1], got nan"),
        (["--model", "./no-such-model-dir", "hi", "--response", "   "], None, "--response is empty"),
        (["--mode", "lenient", "hi"], None, "invalid choice"),
        (["\udcff bad"], None, "not valid UTF-8"),
        (["--device", "meta", "--model", "./no-such-model-dir", "hi"], None,
         "--device 'meta' cannot run a model (meta tensors hold no data)"),
        ([""], None, "qwen3guard: error: the text is empty"),
        (["--lines", "hi"], "a\nb\n", "qwen3guard: error: --lines reads the prompts from stdin"),
    ]
    for args, stdin, message in cases:
        result = run(args, stdin)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert result.stdout == "", (args, result.stdout)  # the error is the whole answer, on stderr


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


@pytest.mark.parametrize(("setting", "action", "status"), [("allow", "allow", 0), ("flag", "flag", 0), ("block", "block", 1)])
def test_the_controversial_setting_chooses_the_action_unless_mode_is_given(
        gen_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], setting: str, action: str,
        status: int) -> None:
    from guard_core.cli import main

    monkeypatch.setenv("QWEN3GUARD_CONTROVERSIAL", setting)
    assert main(["--model", str(gen_dir), CONTROVERSIAL_PROMPT]) == status
    out = json.loads(capsys.readouterr().out)
    assert (out["risk"], out["action"]) == ("Controversial", action)
    assert main(["--model", str(gen_dir), "--mode", "strict", CONTROVERSIAL_PROMPT]) == 1
    assert main(["--model", str(gen_dir), "--mode", "loose", CONTROVERSIAL_PROMPT]) == 0


def test_controversial_review_needs_a_queue_and_records_the_item(gen_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from guard_core.cli import main
    from guard_core.review import ReviewQueue

    monkeypatch.setenv("QWEN3GUARD_CONTROVERSIAL", "review")
    monkeypatch.delenv("QWEN3GUARD_REVIEW_DB", raising=False)
    code = main(["--model", str(gen_dir), CONTROVERSIAL_PROMPT])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, "QWEN3GUARD_REVIEW_DB")
    assert captured.out == ""
    db = tmp_path / "review.db"
    monkeypatch.setenv("QWEN3GUARD_REVIEW_DB", str(db))
    assert main(["--model", str(gen_dir), CONTROVERSIAL_PROMPT]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "review"
    with ReviewQueue(db) as queue:
        [item] = queue.list()
    assert (item.id, item.source, item.status) == (out["review_id"], "cli", "pending")


class _CtrlCOnImport:
    """An import system where the user presses Ctrl-C while a subcommand's module loads."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in ("guard_core.eval.__main__", "guard_core.review_cli"):
            raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["eval", "review"])
def test_ctrl_c_while_a_subcommand_starts_is_one_line_and_exit_130(
        command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from guard_core.cli import main

    for name in ("guard_core.eval.__main__", "guard_core.review_cli"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_CtrlCOnImport(), *sys.meta_path])
    try:
        code = main([command, "--help"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main(): the user gets a traceback")
    assert code == 130
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "\nqwen3guard: interrupted\n")


class _CtrlCOnRead:
    """A terminal pipe on stdin where the user presses Ctrl-C instead of typing a prompt."""

    def isatty(self) -> bool:
        return False

    @property
    def buffer(self) -> object:
        raise KeyboardInterrupt


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from guard_core.cli import main

    monkeypatch.setattr(sys, "stdin", _CtrlCOnRead())
    assert main(["--lines"]) == 130
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "\nqwen3guard: interrupted\n")


def test_a_reader_that_closes_the_pipe_ends_the_program_quietly(gen_dir: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `qwen3guard --lines | head -1` once head has exited
    try:
        result = subprocess.run([sys.executable, "-m", "guard_core", "--model", str(gen_dir), "--lines"],
                                input=f"{SAFE_PROMPT}\n{UNSAFE_PROMPT}\n".encode(), stdout=write_end, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, cwd=ROOT, check=False)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr  # 128 + SIGPIPE, what `yes | head` reports for yes
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr


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


def _run_bytes(args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "guard_core", *args], input=stdin, capture_output=True, env=env,
                          timeout=300, cwd=ROOT, check=False)


def test_lines_split_on_newline_only_and_are_numbered_as_in_the_input(gen_dir: Path) -> None:
    # U+2028, U+0085, a form feed and \x1c-\x1e are str.splitlines() boundaries: one prompt cut into pieces.
    one_prompt = "How can I make\u2028 a\x85 bomb?\x0c\x1c\x1d\x1e now"
    stdin = f"{SAFE_PROMPT}\r\n{one_prompt}\n\n  \nbad\x00line\n{UNSAFE_PROMPT}".encode()
    result = _run_bytes(["--model", str(gen_dir), "--lines"], stdin)
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [line["line"] for line in lines] == [1, 2, 5, 6]
    assert (lines[0]["risk"], lines[3]["risk"]) == ("Safe", "Unsafe") and "risk" in lines[1]
    assert lines[2] == {"line": 5, "error": "line 5: content contains NUL bytes (binary data?)"}
    assert_one_line_error(result.returncode, result.stderr.decode(), "qwen3guard: error: line 5: ")


def test_one_prompt_is_one_verdict_without_a_line_number(gen_dir: Path) -> None:
    result = _run_bytes(["--model", str(gen_dir)], f"{UNSAFE_PROMPT}\u2028{SAFE_PROMPT}\n".encode())
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 1
    assert "line" not in json.loads(result.stdout)


def test_a_model_path_that_is_a_file_is_named_as_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a model", encoding="utf-8")
    result = run(["--model", str(afile), "hi"])
    assert_one_line_error(result.returncode, result.stderr, f"--model {afile} is a file, not a model directory")
    monkeypatch.setenv("QWEN3GUARD_GEN_MODEL", str(afile))
    result = run(["hi"])
    assert_one_line_error(result.returncode, result.stderr, f"QWEN3GUARD_GEN_MODEL={afile} is a file, not a model directory")


@pytest.mark.parametrize(("value", "fragment"), [
    ("gpu", "QWEN3GUARD_DEVICE='gpu' is not one of cpu, mps, cuda, cuda:N"),
    ("meta", "QWEN3GUARD_DEVICE='meta' cannot run a model (meta tensors hold no data)"),
])
def test_a_bad_device_variable_is_named(value: str, fragment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN3GUARD_DEVICE", value)
    result = run(["--model", "./no-such-model-dir", "hi"])
    assert_one_line_error(result.returncode, result.stderr, fragment)
    with pytest.raises(ValueError, match="QWEN3GUARD_DEVICE="):
        Settings.from_env({"QWEN3GUARD_DEVICE": value})
    assert Settings.from_env({"QWEN3GUARD_DEVICE": "cuda:1"}).device == "cuda:1"


def test_a_checkpoint_with_missing_weights_is_one_line_without_the_load_report(gen_dir: Path, tmp_path: Path) -> None:
    broken = gen_without_a_weight(gen_dir, tmp_path)
    result = run(["--model", str(broken), "hi"])
    assert_one_line_error(result.returncode, result.stderr, "does not hold the weights of a Qwen3Guard-Gen model")
    assert "LOAD REPORT" not in result.stderr and "Loading weights" not in result.stderr


def test_a_usage_error_is_one_line_with_a_help_hint() -> None:
    result = run(["--bogus", "hi"])
    assert result.returncode == 2
    assert result.stderr == "qwen3guard: error: unrecognized arguments: --bogus (see qwen3guard --help)\n"
