"""Coalescer: concurrent single calls become batched ones, with no wait when the guard is idle."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from guard_core import GenGuard
from guard_core.batcher import Coalescer
from guard_core.testing import GEN_CASES


def _eight_calls(answer: Callable[[list[int]], list[int]]) -> tuple[list[object], list[list[int]], Coalescer[int, int]]:
    """Calls 0..7 from eight threads: 0 runs alone and is held until 1..7 have queued behind it.

    Returns each call's result (or the exception it raised), the batches ``answer`` was given,
    and the coalescer.
    """
    release, batches = threading.Event(), []

    def batch(items: list[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            assert release.wait(30), "the other callers never queued"
        return answer(items)

    coalescer: Coalescer[int, int] = Coalescer(batch)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(coalescer, 0)]
        while not batches:
            time.sleep(0.001)
        futures += [pool.submit(coalescer, i) for i in range(1, 8)]
        while len(coalescer._queue) < 7:
            time.sleep(0.001)
        release.set()
        outcomes = [f.exception() or f.result() for f in futures]
    return outcomes, batches, coalescer


def test_calls_arriving_during_a_batch_share_the_next_one() -> None:
    outcomes, batches, coalescer = _eight_calls(lambda items: [i * 10 for i in items])
    assert outcomes == [i * 10 for i in range(8)]
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


def test_a_failing_call_fails_alone_and_the_rest_of_its_batch_gets_results() -> None:
    def answer(items: list[int]) -> list[int]:
        if 3 in items:
            raise ValueError("item 3 is bad")
        return [i * 10 for i in items]

    outcomes, batches, _ = _eight_calls(answer)
    assert isinstance(outcomes[3], ValueError) and str(outcomes[3]) == "item 3 is bad"
    assert outcomes[:3] + outcomes[4:] == [0, 10, 20, 40, 50, 60, 70]
    assert batches[1] == [1, 2, 3, 4, 5, 6, 7] and sorted(map(tuple, batches[2:])) == [(i,) for i in range(1, 8)]


def test_a_conversation_the_guard_cannot_take_fails_only_its_own_concurrent_call(gen_dir) -> None:
    # 400 tokens hold a short prompt check, but not the longer response template with any window.
    guard = GenGuard.from_pretrained(str(gen_dir), max_input_tokens=400)
    prompts = [case for case in GEN_CASES if case.messages[-1][0] == "user"] * 3
    answer = [{"role": "user", "content": "How do I bake a chocolate cake?"}, {"role": "assistant", "content": "Step. " * 200}]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(guard.moderate, case.as_messages) for case in prompts]
        bad = pool.submit(guard.moderate, answer)
        verdicts = [f.result() for f in futures]
        with pytest.raises(ValueError, match="too small for the moderation template"):
            bad.result()
    assert [(v.risk, v.categories) for v in verdicts] == [(c.risk, c.categories) for c in prompts]


def test_concurrent_moderate_calls_get_their_own_verdicts(gen_guard: GenGuard) -> None:
    cases = list(GEN_CASES) * 3
    with ThreadPoolExecutor(12) as pool:
        verdicts = list(pool.map(lambda case: gen_guard.moderate(case.as_messages), cases))
    assert [(v.risk, v.categories) for v in verdicts] == [(c.risk, c.categories) for c in cases]
    with pytest.raises(ValueError, match="empty"):
        gen_guard.moderate([{"role": "user", "content": " "}])  # bad input fails its own call, never a batch


def test_a_caller_interrupted_while_it_waits_leaves_the_queue_to_the_others() -> None:
    release = threading.Event()

    def batch(items: list[int]) -> list[int]:
        if items == [0]:
            assert release.wait(30), "the interrupted caller never queued"
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(batch)

    def interrupt_the_waiter() -> None:
        while len(coalescer._queue) < 1:
            time.sleep(0.001)
        time.sleep(0.05)  # the waiter is in wait() by now; a Ctrl-C arrives there
        os.kill(os.getpid(), signal.SIGINT)

    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(coalescer, 0)
        while not coalescer._running:
            time.sleep(0.001)
        threading.Thread(target=interrupt_the_waiter, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            coalescer(1)
        release.set()
        assert leader.result(timeout=30) == 0
        assert pool.submit(coalescer, 2).result(timeout=30) == 20  # nobody waits behind the abandoned call
    assert coalescer._queue == [] and not coalescer._running
