"""Shared fixtures: offline checkpoints built once per machine (cached on disk) and loaded once per run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# With several OpenMP thread teams alive (torch ops run from worker threads), the process can
# abort at interpreter exit after every test passed ("terminate called without an active
# exception"). The tiny test models gain nothing from intra-op threads, so the suite uses one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

from collections.abc import Iterator

from openai_fake_upstream import FakeUpstream

from guard_core import GenGuard, StreamGuard
from guard_core.testing import gen_checkpoint, stream_guard as planted_stream_guard


SHARED_DIR = Path(os.environ.get("QWEN3GUARD_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The public safety datasets laid out beside the checkout (``../shared/datasets``)."""
    path = SHARED_DIR / "datasets"
    if not path.is_dir():
        pytest.fail(f"{path} is missing; set QWEN3GUARD_SHARED_DIR to the folder holding datasets/")
    return path


@pytest.fixture(scope="session")
def gen_dir() -> Path:
    """Directory of the trained tiny Gen checkpoint."""
    return gen_checkpoint()


@pytest.fixture(scope="session")
def gen_guard(gen_dir: Path) -> GenGuard:
    """A GenGuard over the trained tiny checkpoint, shared by the whole run (it is thread-safe)."""
    return GenGuard.from_pretrained(str(gen_dir))


@pytest.fixture(scope="session")
def stream_guard() -> StreamGuard:
    """The planted Stream checkpoint: `` pipe`` and `` bomb`` are Unsafe/Violent, prompts with `` bomb`` are Unsafe."""
    return planted_stream_guard("planted")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """A scripted OpenAI-compatible SSE server on 127.0.0.1, one per test module."""
    with FakeUpstream() as server:
        yield server
