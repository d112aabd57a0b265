"""Coalescer: concurrent single calls become batched ones, with no wait when the guard is idle."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from guard_core import GenGuard
from guard_core.batcher import Coalescer
from guard_core.testing import GEN_CASES


def test_calls_arriving_during_a_batch_share_the_next_one() -> None:
    release, batches = threading.Event(), []

    def batch(items: list[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            assert release.wait(30), "the other callers never queued"
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(batch)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(coalescer, 0)
        while not batches:
            time.sleep(0.001)
        rest = [pool.submit(coalescer, i) for i in range(1, 8)]
        while len(coalescer._queue) < 7:
            time.sleep(0.001)
        release.set()
        assert [first.result(), *(f.result() for f in rest)] == [i * 10 for i in range(8)]
    assert batches == [[0], [1, 2, 3, 4, 5, 6, 7]] and coalescer.batches == 2


def test_an_idle_coalescer_runs_at_once_and_errors_reach_every_caller_of_the_batch() -> None:
    assert Coalescer(lambda items: [x + 1 for x in items])(1) == 2
    with pytest.raises(RuntimeError, match="returned 0 results"):
        Coalescer(lambda items: [])(1)

    def boom(items: list[int]) -> list[int]:
        raise ValueError("broken batch")

    coalescer: Coalescer[int, int] = Coalescer(boom)
    with pytest.raises(ValueError, match="broken batch"):
        coalescer(1)
    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(boom, max_batch=0)


def test_concurrent_moderate_calls_get_their_own_verdicts(gen_guard: GenGuard) -> None:
    cases = list(GEN_CASES) * 3
    with ThreadPoolExecutor(12) as pool:
        verdicts = list(pool.map(lambda case: gen_guard.moderate(case.as_messages), cases))
    assert [(v.risk, v.categories) for v in verdicts] == [(c.risk, c.categories) for c in cases]
    with pytest.raises(ValueError, match="empty"):
        gen_guard.moderate([{"role": "user", "content": " "}])  # bad input fails its own call, never a batch
