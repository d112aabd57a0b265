"""``qwen3guard-proxy`` (``integrations.openai_proxy.__main__``): flags, upstream and address checked before the models load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error, gen_without_a_weight

from guard_core import Moderator
from integrations.openai_proxy.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = "http://127.0.0.1:9/v1"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QWEN3GUARD_UPSTREAM", "QWEN3GUARD_GEN_URL", "QWEN3GUARD_DEVICE", "QWEN3GUARD_PROXY_KEYS"):
        monkeypatch.delenv(name, raising=False)


def _no_model(tmp_path: Path) -> list[str]:
    """Models that cannot load: an error about them would mean the check came after loading."""
    return ["--gen-model", str(tmp_path / "no-gen"), "--stream-model", str(tmp_path / "no-stream")]


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    line = assert_one_line_error(exc.value.code, capsys.readouterr().err, fragment)
    assert line.startswith("qwen3guard-proxy: error: ") and line.endswith("(see qwen3guard-proxy --help)")


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--port", "99999"], "argument --port: must be an integer from 0 to 65535, got '99999'"),
    (["--port", "-1"], "argument --port: must be an integer from 0 to 65535, got '-1'"),
    (["--port", "http"], "argument --port: must be an integer from 0 to 65535, got 'http'"),
    (["--max-choices", "0"], "argument --max-choices: must be an integer from 1 to 128, got '0'"),
    (["--max-choices", "10" * 15], "argument --max-choices: must be an integer from 1 to 128, got '1010"),
    (["--gen-model", ""], "argument --gen-model: is empty; give a model id, directory or server URL"),
    (["--stream-model", " "], "argument --stream-model: is empty; give a model id, directory or server URL"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], fragment: str) -> None:
    _usage_error(capsys, ["--upstream", UPSTREAM, *_no_model(tmp_path), *flags], fragment)


def test_the_upstream_must_be_an_http_url(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _usage_error(capsys, _no_model(tmp_path), "--upstream (or QWEN3GUARD_UPSTREAM) is required")
    for url in ("notaurl", "ftp://host/v1", "http://", "http://host:99999/v1"):
        code = main(["--upstream", url, *_no_model(tmp_path)])
        assert_one_line_error(code, capsys.readouterr().err, f"qwen3guard-proxy: error: --upstream {url!r} ")
    for url, fix in (("http://[::1/v1", "with an IPv6 address in brackets: http://[::1]:8001/v1"),
                     ("http://127.0.0.1:8001\n/v1", "contains a control character (a line end or tab?); remove it")):
        code = main(["--upstream", url, *_no_model(tmp_path)])
        line = assert_one_line_error(code, capsys.readouterr().err, f"qwen3guard-proxy: error: --upstream {url!r} ")
        assert fix in line
    monkeypatch.setenv("QWEN3GUARD_UPSTREAM", "notaurl")
    assert_one_line_error(main(_no_model(tmp_path)), capsys.readouterr().err, "QWEN3GUARD_UPSTREAM='notaurl' is not an http(s)://")
    code = main(["--upstream", "http://user:s3cret@host:99999/v1?api-key=s3cret", *_no_model(tmp_path)])
    line = assert_one_line_error(code, capsys.readouterr().err, "--upstream 'http://***@host:99999/v1?api-key=***' ")
    assert "s3cret" not in line, "keys are never echoed, in an error line either"


@pytest.mark.parametrize("keys", [",", " ", "", " , "])
def test_proxy_keys_that_hold_no_key_are_an_error_not_an_open_proxy(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    monkeypatch.setenv("QWEN3GUARD_PROXY_KEYS", keys)
    code = main(["--upstream", UPSTREAM, *_no_model(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, f"qwen3guard-proxy: error: QWEN3GUARD_PROXY_KEYS={keys!r} holds no key; ")


@pytest.mark.parametrize(("name", "value", "fault"), [
    ("QWEN3GUARD_UPSTREAM_API_KEY", "sk-\nsecret",
     "QWEN3GUARD_UPSTREAM_API_KEY (or OPENAI_API_KEY) has a control character (a line end or tab?) at position 3"),
    ("OPENAI_API_KEY", "sk-\tsecret", "QWEN3GUARD_UPSTREAM_API_KEY (or OPENAI_API_KEY) has a control character"),
    ("QWEN3GUARD_GEN_API_KEY", "sk-\rsecret", "QWEN3GUARD_GEN_API_KEY has a control character"),
    ("QWEN3GUARD_PROXY_KEYS", "team-a,cl\u00e9-secret", "a key in QWEN3GUARD_PROXY_KEYS has a character that is not ASCII at position 2"),
])
def test_keys_no_http_header_can_carry_are_one_line_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                                  fault: str) -> None:
    """Else every request is a 502 blaming the network (upstream key), or no client can present the key (proxy key)."""
    monkeypatch.delenv("QWEN3GUARD_UPSTREAM_API_KEY", raising=False)
    monkeypatch.setenv(name, value)
    line = assert_one_line_error(main(["--upstream", UPSTREAM, *_no_model(tmp_path)]), capsys.readouterr().err, fault)
    assert "secret" not in line


def test_a_hub_id_that_cannot_be_fetched_names_the_proxy_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--upstream", UPSTREAM, "--port", "0", "--gen-model", "Qwen/Qwen3Guard-Gen-Nonexistent",
                 "--stream-model", str(tmp_path / "no-stream")])
    line = assert_one_line_error(code, capsys.readouterr().err, "--gen-model or --stream-model ./Qwen3Guard-Gen-Nonexistent")
    assert line.count("'") % 2 == 0, "the hub's reason is cut mid-quote"


def test_ctrl_c_while_loading_is_one_line_and_status_130(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Moderator) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Moderator, "load", interrupted)
    try:
        code = main(["--upstream", UPSTREAM, "--port", "0", *_no_model(tmp_path)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a traceback")
    assert assert_one_line_error(code, capsys.readouterr().err, "", status=130) == "qwen3guard-proxy: interrupted"


def test_a_port_in_use_is_one_line_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--upstream", UPSTREAM, "--port", str(port), *_no_model(tmp_path)])
    line = assert_one_line_error(code, capsys.readouterr().err, "")
    assert line == f"qwen3guard-proxy: error: port {port} on 127.0.0.1 is in use; pick another with --port"


def test_bad_hosts_devices_and_model_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    code = main(["--upstream", UPSTREAM, "--host", "no-such-host.invalid", *_no_model(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "--host 'no-such-host.invalid' cannot be resolved")
    afile = tmp_path / "afile"
    afile.write_text("not a model", encoding="utf-8")
    code = main(["--upstream", UPSTREAM, "--gen-model", str(afile)])
    assert_one_line_error(code, capsys.readouterr().err, f"--gen-model {afile} is a file, not a model directory")
    monkeypatch.setenv("QWEN3GUARD_DEVICE", "meta")
    code = main(["--upstream", UPSTREAM, *_no_model(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "QWEN3GUARD_DEVICE='meta' cannot run a model")


def test_a_model_that_cannot_load_is_one_line_without_transformers_output(gen_dir: Path, tmp_path: Path) -> None:
    from guard_core.testing.stream_fixture import stream_checkpoint

    env = {k: v for k, v in os.environ.items() if k not in ("QWEN3GUARD_UPSTREAM", "QWEN3GUARD_GEN_URL")}
    argv = ["--upstream", UPSTREAM, "--port", "0", "--gen-model", str(gen_without_a_weight(gen_dir, tmp_path)),
            "--stream-model", str(stream_checkpoint("planted"))]
    result = subprocess.run([sys.executable, "-m", "integrations.openai_proxy", *argv], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(ROOT)}, timeout=300, cwd=ROOT, check=False)
    assert_one_line_error(result.returncode, result.stderr, "does not hold the weights of a Qwen3Guard-Gen model")
    assert "LOAD REPORT" not in result.stderr and "Loading weights" not in result.stderr


def test_the_port_is_held_from_the_check_on_so_a_second_proxy_cannot_take_it_during_loading(
        gen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from guard_core.testing.stream_fixture import stream_checkpoint

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("QWEN3GUARD_UPSTREAM", "QWEN3GUARD_GEN_URL")}
    argv = ["--upstream", UPSTREAM, "--port", str(port), "--gen-model", str(gen_dir), "--stream-model", str(stream_checkpoint("planted"))]
    first = subprocess.Popen([sys.executable, "-m", "integrations.openai_proxy", *argv], stderr=subprocess.PIPE, text=True,
                             env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    try:
        while first.poll() is None:  # the first proxy listens as soon as its flags are checked
            try:
                socket.create_connection(("127.0.0.1", port), timeout=30).close()
                break
            except OSError:
                continue
        code = main(["--upstream", UPSTREAM, "--port", str(port), *_no_model(tmp_path)])
        line = assert_one_line_error(code, capsys.readouterr().err, "")
        assert line == f"qwen3guard-proxy: error: port {port} on 127.0.0.1 is in use; pick another with --port"
        assert first.stderr is not None
        announced = next((line for line in first.stderr if line.startswith("qwen3guard-proxy: ")), "")
        assert announced == f"qwen3guard-proxy: serving http://127.0.0.1:{port}/v1 in front of {UPSTREAM}\n"
    finally:
        first.terminate()
        first.wait(60)


def test_ctrl_c_while_serving_shuts_down_cleanly_with_status_130(gen_dir: Path) -> None:
    """Also: credentials in the upstream URL are not printed (keys are never echoed)."""
    from guard_core.testing.stream_fixture import stream_checkpoint

    env = {k: v for k, v in os.environ.items() if k not in ("QWEN3GUARD_UPSTREAM", "QWEN3GUARD_GEN_URL")}
    argv = ["--upstream", "http://user:s3cret@127.0.0.1:9/v1", "--port", "0", "--gen-model", str(gen_dir),
            "--stream-model", str(stream_checkpoint("planted"))]
    proxy = subprocess.Popen([sys.executable, "-m", "integrations.openai_proxy", *argv], stderr=subprocess.PIPE, text=True,
                             env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    try:
        assert proxy.stderr is not None
        announced = next((line for line in proxy.stderr if line.startswith("qwen3guard-proxy: ")), "")
        assert announced.startswith("qwen3guard-proxy: serving http://127.0.0.1:")
        assert announced.endswith(" in front of http://***@127.0.0.1:9/v1\n")
        proxy.send_signal(signal.SIGINT)
        rest = proxy.stderr.read()
        assert proxy.wait(60) == 130
    finally:
        proxy.kill()
        proxy.wait(60)
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "qwen3guard-proxy: interrupted", rest
