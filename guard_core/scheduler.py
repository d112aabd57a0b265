"""Advancing many live Stream sessions with one forward per step.

On a CPU one decode step of the 0.6B guard is memory-bound: reading the weights dominates, so a
step over 16 tokens costs about as much as a step over one. A single worker thread therefore
takes the queued tokens of *every* session (however many each has) and runs them in one packed
forward (``stream_model.packed_forward``): no padding, each session attending only to its own
cache. Whatever arrives while a step runs goes into the next step, so no session falls more
than one step behind its producer, and N streams cost far less than N separate ones.

The worker does as little as possible besides the forward: tokens are queued as whole chunks
(no object per token), the heads' softmax is taken once per step for all sessions together,
and it waits for the sessions of the last step to queue again only until the last of them has
(``gather_s`` bounds that wait). Callers block on a ``Ticket`` (threads) or await it (asyncio)
without occupying a thread. The worker exits after a short idle period so an abandoned guard
does not keep a thread alive, and it is stopped and joined at interpreter exit: a daemon thread
still inside a torch operator when Python finalizes aborts the whole process ("terminate called
without an active exception", from the forced unwind through torch's C++ frames). For the same
reason a session closed after that (a user's daemon thread dropping it) keeps its cache instead
of freeing it: freeing a tensor is such an operator.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import check_count
from .stream_model import HeadProbabilities, KVStore, Qwen3ForGuardModel, packed_forward

logger = logging.getLogger("guard_core.scheduler")

#: Called in the worker with the metadata of a step's scored tokens (those queued with a
#: non-``None`` meta, in order) and their head probabilities.
ProbabilitiesCallback = Callable[[Sequence[Any], HeadProbabilities], None]


@dataclass
class _Chunk:
    ids: list[int]
    metas: list[Any]
    reset: bool


@dataclass(eq=False)
class Lane:
    """One session's place in the scheduler: its cache, queued tokens and progress counters."""

    store: KVStore
    on_probabilities: ProbabilitiesCallback
    queue: deque[_Chunk] = field(default_factory=deque)
    queued: int = 0
    submitted: int = 0
    done: int = 0
    error: BaseException | None = None
    closed: bool = False
    running: int = 0
    tickets: list[Ticket] = field(default_factory=list)

    def take(self, budget: int) -> _Chunk:
        """Up to ``budget`` queued tokens, stopping before a cache reset that is not the first."""
        ids: list[int] = []
        metas: list[Any] = []
        reset = self.queue[0].reset
        while self.queue and len(ids) < budget and not (ids and self.queue[0].reset):
            chunk = self.queue[0]
            room = budget - len(ids)
            if len(chunk.ids) <= room:
                self.queue.popleft()
                ids += chunk.ids
                metas += chunk.metas
            else:
                ids += chunk.ids[:room]
                metas += chunk.metas[:room]
                self.queue[0] = _Chunk(chunk.ids[room:], chunk.metas[room:], False)
        self.queued -= len(ids)
        return _Chunk(ids, metas, reset)


class Ticket:
    """Completion of the tokens queued by one ``submit``; wait on it from threads or asyncio."""

    def __init__(self, lane: Lane, target: int, cond: threading.Condition) -> None:
        self._lane, self.target, self._cond = lane, target, cond
        self._done = False
        self.error: BaseException | None = None
        self._blocker = threading.Lock()
        self._blocker.acquire()
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def _resolve(self) -> None:
        """Mark done and wake every waiter (called with the scheduler's lock held)."""
        if self._done:
            return
        self._done = True
        self._blocker.release()
        for loop, fut in self._futures:
            try:
                loop.call_soon_threadsafe(_finish_future, fut)
            except RuntimeError:  # the loop is closed: nobody is awaiting this any more
                pass
        self._futures.clear()

    def wait(self) -> None:
        """Block until the tokens are judged; re-raise a failure of the forward."""
        if not self._done:
            with self._blocker:
                pass
        self._raise()

    async def wait_async(self) -> None:
        """Await the tokens without holding a thread or blocking the event loop."""
        fut: asyncio.Future[None] | None = None
        with self._cond:
            if not self._done:
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                self._futures.append((loop, fut))
        if fut is not None:
            await fut
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
        if self._lane.error is not None:
            raise RuntimeError(f"Stream guard step failed: {self._lane.error}") from self._lane.error


def _finish_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class StreamScheduler:
    """Batches the pending tokens of all sessions of one model into packed forwards."""

    def __init__(
        self, model: Qwen3ForGuardModel, *, max_tokens_per_step: int = 512, idle_exit_s: float = 2.0, gather_s: float = 0.002
    ) -> None:
        self.model = model
        self.gather_s = gather_s
        self.max_tokens_per_step = check_count(max_tokens_per_step, "max_tokens_per_step")
        self.idle_exit_s = idle_exit_s
        self._cond = threading.Condition()
        self._lanes: list[Lane] = []
        self._awaited: set[Lane] = set()
        self._sleeping: str | None = None
        self._stopped = False
        self._kept_at_exit: list[KVStore] = []
        self._worker: threading.Thread | None = None
        self.steps = 0
        _LIVE.add(self)

    @property
    def active_lanes(self) -> int:
        """Open sessions known to the scheduler."""
        with self._cond:
            return len(self._lanes)

    def open_lane(self, on_probabilities: ProbabilitiesCallback) -> Lane:
        """Register a session; its cache lives in the returned lane."""
        param = next(self.model.parameters())
        lane = Lane(KVStore(self.model.config, dtype=param.dtype, device=param.device), on_probabilities)
        with self._cond:
            self._lanes.append(lane)
        return lane

    def close_lane(self, lane: Lane) -> None:
        """Forget a session and free its cache (after the step using it, if one is running)."""
        with self._cond:
            lane.closed = True
            lane.queue.clear()
            lane.queued = 0
            if lane in self._lanes:
                self._lanes.remove(lane)
            self._stop_awaiting(lane)
            if self._stopped:
                # Interpreter exit: freeing a tensor releases the GIL, and a daemon thread that lets
                # go of it once Python finalizes is killed inside torch's C++ frames (an abort). The
                # cache is left to the interpreter's own teardown instead.
                self._kept_at_exit.append(lane.store)
            elif not lane.running:
                lane.store.release()
            for ticket in lane.tickets:
                ticket._resolve()
            lane.tickets.clear()

    def submit(self, lane: Lane, ids: Sequence[int], metas: Sequence[Any], *, reset: bool = False) -> Ticket:
        """Queue tokens of one session; ``reset`` restarts its cache at the first of them."""
        with self._cond:
            if lane.closed:
                raise RuntimeError("the Stream session is closed")
            if self._stopped:
                raise RuntimeError("the Stream guard is shut down (at interpreter exit); it judges no more tokens")
            if ids:
                lane.queue.append(_Chunk(list(ids), list(metas), reset))
                lane.queued += len(ids)
                lane.submitted += len(ids)
            ticket = Ticket(lane, lane.submitted, self._cond)
            if lane.done >= ticket.target:
                ticket._resolve()
                return ticket
            lane.tickets.append(ticket)
            self._stop_awaiting(lane)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="qwen3guard-stream", daemon=True)
                self._worker.start()
            elif self._sleeping == "idle":
                self._cond.notify()
            return ticket

    def shutdown(self) -> None:
        """Stop taking tokens, let the step in flight finish and join the worker.

        Runs at interpreter exit for every scheduler. Callers waiting for tokens that are not in
        the running step get ``RuntimeError``; those in it get their verdicts. Idempotent.
        """
        with self._cond:
            self._stopped = True
            for lane in self._lanes:
                covered = lane.done + lane.running
                for ticket in [t for t in lane.tickets if t.target > covered]:
                    ticket.error = RuntimeError("the Stream guard was shut down before these tokens were judged")
                    ticket._resolve()
                lane.tickets = [t for t in lane.tickets if t.target <= covered]
                lane.queue.clear()
                lane.queued = 0
            worker = self._worker
            self._cond.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join()

    def _stop_awaiting(self, lane: Lane) -> None:
        self._awaited.discard(lane)
        if self._sleeping == "gather" and not self._awaited:
            self._cond.notify()

    def _take_batch(self) -> list[tuple[Lane, _Chunk]]:
        """Smallest queues first, so decode tokens of live streams never wait behind a prefill."""
        budget = self.max_tokens_per_step
        batch = []
        for lane in sorted((x for x in self._lanes if x.queued), key=lambda x: x.queued):
            if budget <= 0:
                break
            chunk = lane.take(budget)
            batch.append((lane, chunk))
            lane.running = len(chunk.ids)
            budget -= len(chunk.ids)
        return batch

    def _wait(self, why: str, timeout: float) -> bool:
        """Wait on the condition (lock held); ``why`` tells ``submit`` when to wake the worker."""
        self._sleeping = why
        try:
            return self._cond.wait(timeout)
        finally:
            self._sleeping = None

    def _gather(self) -> None:
        """Give the sessions of the last step a moment (``gather_s``) to queue their next tokens.

        Their callers were just woken and need the GIL to submit; starting the next step at once
        would split one round of feeds over several small steps. The wait ends as soon as the
        last of them has queued.
        """
        deadline = time.monotonic() + self.gather_s
        while self._awaited and not self._stopped:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wait("gather", left)
        self._awaited.clear()

    def _has_work(self) -> bool:
        return any(lane.queued for lane in self._lanes)

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._complete(batch, self._step(batch))
        finally:
            with self._cond:
                if self._worker is threading.current_thread():
                    self._worker = None

    def _next_batch(self) -> list[tuple[Lane, _Chunk]] | None:
        """The next step's tokens, or ``None`` once the worker has retired (idle or stopped).

        Retiring happens under the lock, so a ``submit`` either finds this worker awake or
        starts a new one.
        """
        with self._cond:
            while not self._stopped:
                if not self._has_work() and not self._wait("idle", self.idle_exit_s) and not self._has_work():
                    break
                self._gather()
                batch = self._take_batch()
                if batch:
                    return batch
            self._worker = None
            return None

    def _complete(self, batch: list[tuple[Lane, _Chunk]], error: BaseException | None) -> None:
        """Account for a finished step and wake the callers whose tokens are all judged."""
        with self._cond:
            self.steps += 1
            if len(batch) > 1:
                self._awaited = {lane for lane, _ in batch if not lane.closed and not lane.queued}
            for lane, chunk in batch:
                lane.running = 0
                lane.done += len(chunk.ids)
                if error is not None or lane.error is not None:
                    lane.error = lane.error or error
                    lane.done = lane.submitted
                    lane.queue.clear()
                    lane.queued = 0
                if lane.closed:
                    lane.store.release()
                self._resolve_ready(lane)

    @staticmethod
    def _resolve_ready(lane: Lane) -> None:
        ready = [t for t in lane.tickets if lane.done >= t.target]
        lane.tickets = [t for t in lane.tickets if lane.done < t.target]
        for ticket in ready:
            ticket._resolve()

    def _step(self, batch: list[tuple[Lane, _Chunk]]) -> BaseException | None:
        """One packed forward; a failure of the forward is handed to every lane of the batch."""
        try:
            for lane, chunk in batch:
                if chunk.reset:
                    lane.store.length = 0
            logits = packed_forward(self.model, [lane.store for lane, _ in batch], [chunk.ids for _, chunk in batch])
            rows, spans, offset = [], [], 0
            for _, chunk in batch:
                first = len(rows)
                rows.extend(offset + i for i, meta in enumerate(chunk.metas) if meta is not None)
                spans.append((first, len(rows)))
                offset += len(chunk.ids)
            probs = HeadProbabilities.of(logits, rows) if rows else None
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            return exc
        for (lane, chunk), (first, last) in zip(batch, spans):
            if probs is None or first == last or lane.closed:
                continue
            try:
                lane.on_probabilities([m for m in chunk.metas if m is not None], probs.slice(first, last))
            except Exception as exc:  # noqa: BLE001 - this session's own failure, handed to its caller
                lane.error = exc
        return None


_LIVE: weakref.WeakSet[StreamScheduler] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    """Join every worker before the interpreter finalizes (see the module docstring)."""
    for scheduler in list(_LIVE):
        scheduler.shutdown()

