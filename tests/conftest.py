"""Shared fixtures: offline checkpoints built once per machine (cached on disk) and loaded once per run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI
from openai_fake_upstream import FakeUpstream

from guard_core import GenGuard, StreamGuard
from guard_core.testing import gen_checkpoint, stream_guard as planted_stream_guard
from integrations.openai_proxy import guard_openai


SHARED_DIR = Path(os.environ.get("QWEN3GUARD_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The public safety datasets (optional): ``shared/datasets`` beside the checkout, or ``$QWEN3GUARD_SHARED_DIR/datasets``.

    Tests that read them are skipped when they are absent, so a plain clone's suite passes.
    """
    path = SHARED_DIR / "datasets"
    if not path.is_dir():
        pytest.skip(f"needs the public safety datasets, not found at {path} (put them in shared/datasets "
                    "beside the checkout, or set QWEN3GUARD_SHARED_DIR to the folder holding datasets/)")
    return path


@contextmanager
def _uncaptured(config: pytest.Config) -> Iterator[None]:
    """Let a first-run fixture build's progress lines reach the terminal; pytest would swallow them."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
        yield


@pytest.fixture(scope="session")
def gen_dir(pytestconfig: pytest.Config) -> Path:
    """Directory of the trained tiny Gen checkpoint."""
    with _uncaptured(pytestconfig):
        return gen_checkpoint()


@pytest.fixture(scope="session")
def gen_guard(gen_dir: Path) -> GenGuard:
    """A GenGuard over the trained tiny checkpoint, shared by the whole run (it is thread-safe)."""
    return GenGuard.from_pretrained(str(gen_dir))


@pytest.fixture(scope="session")
def stream_guard(pytestconfig: pytest.Config) -> StreamGuard:
    """The planted Stream checkpoint: `` pipe`` and `` bomb`` are Unsafe/Violent, prompts with `` bomb`` are Unsafe."""
    with _uncaptured(pytestconfig):
        return planted_stream_guard("planted")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """A scripted OpenAI-compatible SSE server on 127.0.0.1, one per test module."""
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def bare(upstream: FakeUpstream) -> OpenAI:
    """The plain openai client of the fake upstream (what ``guard_openai`` wraps)."""
    return OpenAI(base_url=upstream.base_url, api_key="sk-test", max_retries=0)


@pytest.fixture
def abare(upstream: FakeUpstream) -> AsyncOpenAI:
    """The async twin of ``bare``."""
    return AsyncOpenAI(base_url=upstream.base_url, api_key="sk-test", max_retries=0)


@pytest.fixture
def guard(stream_guard: StreamGuard, gen_guard: GenGuard) -> Callable[..., Any]:
    """``guard(client, **options)``: the client wrapped with both test guards."""
    def make(client: Any, **kwargs: Any) -> Any:
        return guard_openai(client, stream_guard=stream_guard, gen_guard=gen_guard, **kwargs)
    return make
