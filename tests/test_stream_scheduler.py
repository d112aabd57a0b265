"""The Stream scheduler's worker: shutdown, asyncio callers, and a clean interpreter exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from guard_core.stream import StreamGuard
from guard_core.testing.stream_fixture import stream_checkpoint, stream_guard

USER = [{"role": "user", "content": "Tell me about lighthouses."}]
#: Bounds a wait that only a bug could make long (a hang guard, never a timing assertion).
HANG_S = 60


def test_shutdown_finishes_the_step_in_flight_and_refuses_new_tokens() -> None:
    base = stream_guard("random")
    guard = StreamGuard(base.model, base.tokens)
    ids = base.tokens.encode_text(" The keeper climbed the stairs every night.")
    running, release, submitted = threading.Event(), threading.Event(), threading.Event()
    workers: list[threading.Thread] = []
    first, second = guard.session(USER), guard.session(USER)
    step, submit = guard.scheduler._step, guard.scheduler.submit

    def held_step(batch):
        workers.append(threading.current_thread())
        running.set()
        assert release.wait(HANG_S)
        return step(batch)

    def noted_submit(*args, **kwargs):
        ticket = submit(*args, **kwargs)
        submitted.set()
        return ticket

    guard.scheduler._step = held_step  # type: ignore[method-assign]
    guard.scheduler.submit = noted_submit  # type: ignore[method-assign]
    results: dict[str, object] = {}

    def feed(name, session) -> None:
        try:
            results[name] = session.feed_ids(ids)
        except RuntimeError as exc:
            results[name] = exc

    in_flight = threading.Thread(target=feed, args=("in_flight", first))
    in_flight.start()
    assert running.wait(HANG_S)
    submitted.clear()
    queued = threading.Thread(target=feed, args=("queued", second))
    queued.start()
    assert submitted.wait(HANG_S)
    stopper = threading.Thread(target=guard.scheduler.shutdown)
    stopper.start()
    release.set()
    for t in (in_flight, queued, stopper):
        t.join(HANG_S)
    assert [t.token_id for t in results["in_flight"]] == ids  # type: ignore[union-attr]
    assert isinstance(results["queued"], RuntimeError) and "shut down" in str(results["queued"])
    assert not workers[0].is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        guard.session(USER)
    guard.scheduler.shutdown()


async def test_async_callers_never_block_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step waits until the loop has run again after it started: a blocked loop would hang it."""
    guard = stream_guard("planted")
    ticked = threading.Event()  # set by the event loop on every turn
    step = guard.scheduler._step

    def step_needing_the_loop(batch):
        ticked.clear()
        assert ticked.wait(HANG_S), "the event loop did not run while a Stream step was in flight"
        return step(batch)

    monkeypatch.setattr(guard.scheduler, "_step", step_needing_the_loop)
    finished = asyncio.Event()

    async def ticker() -> None:
        while not finished.is_set():
            ticked.set()
            await asyncio.sleep(0.0005)

    async def moderate(i: int) -> str:
        async with await guard.asession([{"role": "user", "content": f"question {i}"}]) as s:
            tokens = await s.afeed(f"Answer number {i} is short.") + await s.afinish()
            return "".join(t.text for t in tokens)

    ticking = asyncio.create_task(ticker())
    answers = await asyncio.gather(*(moderate(i) for i in range(3)))
    finished.set()
    await ticking
    assert answers == [f"Answer number {i} is short." for i in range(3)]


EXIT_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import torch
    from guard_core.stream import StreamGuard

    guard = StreamGuard.from_pretrained(sys.argv[1])
    started = threading.Barrier(5)

    def torch_work():
        x = torch.randn(192, 192)
        started.wait()
        for _ in range(40):
            x = torch.tanh(x @ x)

    def stream_forever(i):
        session = guard.session([{"role": "user", "content": f"question {i}"}])
        started.wait()
        while True:
            try:
                session.feed("and the next words of a long answer " * 4)
            except RuntimeError:  # the guard shut down at exit: a producer stops there
                return

    workers = [threading.Thread(target=torch_work) for _ in range(2)]
    workers += [threading.Thread(target=stream_forever, args=(i,), daemon=True) for i in range(3)]
    for t in workers:
        t.start()
    time.sleep(0.2)
    print("exiting with the Stream worker busy", flush=True)
""")


#: Before the fix every run of this script aborted, so three clean exits in a row prove it.
EXIT_RUNS = 3


def test_interpreter_exits_cleanly_while_sessions_are_busy(tmp_path: Path) -> None:
    """Exit while the worker is inside torch ops, OpenMP teams alive in other threads (was a SIGABRT)."""
    script = tmp_path / "exit_busy.py"
    script.write_text(EXIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    checkpoint = str(stream_checkpoint("random"))
    for run in range(EXIT_RUNS):
        done = subprocess.run([sys.executable, str(script), checkpoint], capture_output=True, text=True, env=env, timeout=300, check=False)
        assert "exiting with the Stream worker busy" in done.stdout, done.stderr[-2000:]
        assert "terminate called" not in done.stderr, f"run {run}: {done.stderr[-2000:]}"
        assert done.returncode == 0, f"run {run}: exit {done.returncode}: {done.stderr[-2000:]}"


def test_a_session_closed_after_shutdown_keeps_its_cache_for_teardown() -> None:
    """At exit a daemon thread dropping a session must not free tensors (that releases the GIL inside torch)."""
    guard = StreamGuard.from_pretrained(str(stream_checkpoint("random")))
    open_session = guard.session([{"role": "user", "content": "question"}])
    open_session.feed("an answer being streamed")
    closed_before = guard.session([{"role": "user", "content": "another"}])
    closed_before.close()
    assert closed_before._lane.store.length == 0  # a session closed while the guard runs frees its cache
    guard.scheduler.shutdown()
    store = open_session._lane.store
    cached = store.length
    open_session.close()
    assert cached > 0 and store.length == cached and store.keys  # not freed ...
    assert guard.scheduler._kept_at_exit == [store]  # ... but held by the scheduler until teardown
    with pytest.raises(RuntimeError, match="shut down"):
        guard.session([{"role": "user", "content": "late"}])


@pytest.mark.parametrize("budget", [0, -1, 2.5])
def test_a_step_budget_that_could_never_run_a_token_is_refused(budget: object) -> None:
    with pytest.raises(ValueError, match="max_tokens_per_step must be an int >= 1"):
        StreamGuard.from_pretrained(str(stream_checkpoint("planted")), max_tokens_per_step=budget)  # type: ignore[arg-type]
