"""examples/openai_stream.py runs as written against a local OpenAI-compatible server and the test checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from openai_fake_upstream import FakeUpstream, Script, chat_events

from guard_core.testing.cases import UNSAFE_PROMPT
from guard_core.testing.stream_fixture import PLANTED_SAFE_PROMPT, stream_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_example(upstream: FakeUpstream, gen_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_BASE_URL": upstream.base_url, "OPENAI_API_KEY": "sk-test", "OPENAI_MODEL": "fake-model",
           "QWEN3GUARD_GEN_MODEL": str(gen_dir), "QWEN3GUARD_STREAM_MODEL": str(stream_checkpoint("planted"))}
    return subprocess.run([sys.executable, str(ROOT / "examples" / "openai_stream.py"), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "pieces,args,code,expected",
    [
        (["Preheat the oven", " to 180C", " and bake."], [], 0,
         "Preheat the oven to 180C and bake.\n[finish_reason=stop; guard verdict: response Safe]\n"),
        (["Sure, take a", " pipe", " bomb", " and light it."], ["--on-unsafe", "rewrite"], 0,
         "Sure, take a\n\nI'm sorry, but I can't help with that.\n[finish_reason=content_filter; guard verdict: response Unsafe]\n"),
        (["Sure, take a", " pipe", " bomb", " and light it."], [], 1,
         "Sure, take a\n[blocked response: Unsafe (Violent); delivered 12 characters before the stop]\n"),
    ],
)
def test_example_streams_through_the_guard(gen_dir: Path, pieces: list[str], args: list[str], code: int, expected: str) -> None:
    with FakeUpstream() as upstream:
        upstream.push(Script(events=chat_events(pieces)))
        result = run_example(upstream, gen_dir, PLANTED_SAFE_PROMPT, *args)
        assert (result.returncode, result.stdout) == (code, expected), result.stderr
        assert upstream.exchanges[0].body["messages"] == [{"role": "user", "content": PLANTED_SAFE_PROMPT}]


def test_example_blocked_prompt_is_never_sent(gen_dir: Path) -> None:
    with FakeUpstream() as upstream:
        result = run_example(upstream, gen_dir, UNSAFE_PROMPT)
        assert result.returncode == 1, result.stderr
        assert result.stdout == "\n[blocked prompt: Unsafe (Violent); delivered 0 characters before the stop]\n"
        assert upstream.exchanges == []


def test_example_says_in_one_line_when_the_server_or_a_model_cannot_be_reached(gen_dir: Path) -> None:
    from gen_server import unused_url

    with FakeUpstream() as upstream:
        upstream.push(Script(events=chat_events(["Preheat the oven."])))
        result = run_example(upstream, gen_dir, PLANTED_SAFE_PROMPT, "--stream-model", "./no-such-dir")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("openai_stream.py: error:") and "no-such-dir" in last
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_stream.py"), PLANTED_SAFE_PROMPT],
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": unused_url(), "OPENAI_API_KEY": "k",
                                 "QWEN3GUARD_GEN_MODEL": str(gen_dir), "QWEN3GUARD_STREAM_MODEL": str(stream_checkpoint("planted"))},
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("openai_stream.py: error: Connection error")


def test_example_without_an_api_key_says_so_in_one_line(gen_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_stream.py"), PLANTED_SAFE_PROMPT],
                            env={**env, "PYTHONPATH": str(ROOT), "QWEN3GUARD_GEN_MODEL": str(gen_dir),
                                 "QWEN3GUARD_STREAM_MODEL": str(stream_checkpoint("planted"))},
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "OPENAI_API_KEY" in result.stderr
