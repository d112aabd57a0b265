"""Advancing many live Stream sessions with one forward per step.

On a CPU one decode step of the 0.6B guard is memory-bound: reading the weights dominates, so a
step over 16 tokens costs about as much as a step over one. A single worker thread therefore
takes the queued tokens of *every* session (however many each has) and runs them in one packed
forward (``stream_model.packed_forward``): no padding, each session attending only to its own
cache. Whatever arrives while a step runs goes into the next step, so no session falls more
than one step behind its producer, and N streams cost far less than N separate ones.

Callers block on a ``Ticket`` (threads) or await it (asyncio) without occupying a thread; the
worker exits after a short idle period so an abandoned guard does not keep a thread alive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .stream_model import GuardLogits, KVStore, Qwen3ForGuardModel, packed_forward

#: Called in the worker with the step's metadata entries and their logits rows.
LogitsCallback = Callable[[Sequence[Any], GuardLogits], None]


@dataclass
class _Entry:
    token_id: int
    meta: Any
    reset: bool


@dataclass
class Lane:
    """One session's place in the scheduler: its cache, queued tokens and progress counters."""

    store: KVStore
    on_logits: LogitsCallback
    queue: list[_Entry] = field(default_factory=list)
    submitted: int = 0
    done: int = 0
    error: BaseException | None = None
    closed: bool = False
    in_flight: bool = False
    tickets: list[Ticket] = field(default_factory=list)


class Ticket:
    """Completion of the tokens queued by one ``submit``; wait on it from threads or asyncio."""

    def __init__(self, scheduler: StreamScheduler, lane: Lane, target: int) -> None:
        self._scheduler, self._lane, self.target = scheduler, lane, target
        self._event = threading.Event()
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def _resolve(self) -> None:
        self._event.set()
        for loop, fut in self._futures:
            loop.call_soon_threadsafe(_finish_future, fut)
        self._futures.clear()

    def wait(self) -> None:
        """Block until the tokens are judged; re-raise a failure of the forward."""
        self._event.wait()
        self._raise()

    async def wait_async(self) -> None:
        """Await the tokens without holding a thread."""
        with self._scheduler._cond:
            if not self._event.is_set():
                loop = asyncio.get_running_loop()
                fut: asyncio.Future[None] = loop.create_future()
                self._futures.append((loop, fut))
            else:
                fut = None  # type: ignore[assignment]
        if fut is not None:
            await fut
        self._raise()

    def _raise(self) -> None:
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
        self.max_tokens_per_step = max_tokens_per_step
        self.idle_exit_s = idle_exit_s
        self._cond = threading.Condition()
        self._lanes: list[Lane] = []
        self._worker: threading.Thread | None = None
        self.steps = 0

    @property
    def active_lanes(self) -> int:
        """Open sessions known to the scheduler."""
        with self._cond:
            return len(self._lanes)

    def open_lane(self, on_logits: LogitsCallback) -> Lane:
        """Register a session; its cache lives in the returned lane."""
        param = next(self.model.parameters())
        lane = Lane(KVStore(self.model.config, dtype=param.dtype, device=param.device), on_logits)
        with self._cond:
            self._lanes.append(lane)
        return lane

    def close_lane(self, lane: Lane) -> None:
        """Forget a session and free its cache (after the step using it, if one is running)."""
        with self._cond:
            lane.closed = True
            lane.queue.clear()
            if lane in self._lanes:
                self._lanes.remove(lane)
            if not lane.in_flight:
                lane.store.release()
            for ticket in lane.tickets:
                ticket._resolve()
            lane.tickets.clear()

    def submit(self, lane: Lane, ids: Sequence[int], metas: Sequence[Any], *, reset: bool = False) -> Ticket:
        """Queue tokens of one session; ``reset`` restarts its cache at the first of them."""
        with self._cond:
            if lane.closed:
                raise RuntimeError("the Stream session is closed")
            lane.queue.extend(_Entry(t, m, reset and i == 0) for i, (t, m) in enumerate(zip(ids, metas)))
            lane.submitted += len(ids)
            ticket = Ticket(self, lane, lane.submitted)
            if lane.done >= ticket.target:
                ticket._resolve()
            else:
                lane.tickets.append(ticket)
                self._ensure_worker()
                self._cond.notify_all()
            return ticket

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name="qwen3guard-stream", daemon=True)
            self._worker.start()

    def _take_batch(self) -> list[tuple[Lane, list[_Entry]]]:
        """Smallest queues first, so decode tokens of live streams never wait behind a prefill."""
        budget = self.max_tokens_per_step
        batch = []
        for lane in sorted((x for x in self._lanes if x.queue), key=lambda x: len(x.queue)):
            if budget <= 0:
                break
            n = min(len(lane.queue), budget)
            n = next((i for i in range(1, n) if lane.queue[i].reset), n)
            batch.append((lane, lane.queue[:n]))
            del lane.queue[:n]
            lane.in_flight = True
            budget -= n
        return batch

    def _gather(self, previous: list[Lane]) -> None:
        """Give the sessions of the last step a moment (``gather_s``) to queue their next tokens.

        Their callers were just woken and need the GIL to submit; starting the next step at once
        would split one round of feeds over several small steps.
        """
        deadline = time.monotonic() + self.gather_s
        while any(not lane.queue and not lane.closed for lane in previous):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _run(self) -> None:
        previous: list[Lane] = []
        while True:
            with self._cond:
                if not any(lane.queue for lane in self._lanes):
                    self._cond.wait(self.idle_exit_s)
                    if not any(lane.queue for lane in self._lanes):
                        self._worker = None
                        return
                if len(previous) > 1:
                    self._gather(previous)
                batch = self._take_batch()
                previous = [lane for lane, _ in batch]
            error = self._step(batch)
            with self._cond:
                self.steps += 1
                for lane, entries in batch:
                    lane.in_flight = False
                    lane.done += len(entries)
                    if error is not None:
                        lane.error = error
                        lane.done = lane.submitted
                        lane.queue.clear()
                    if lane.closed:
                        lane.store.release()
                    ready = [t for t in lane.tickets if lane.done >= t.target]
                    lane.tickets = [t for t in lane.tickets if lane.done < t.target]
                    for ticket in ready:
                        ticket._resolve()

    def _step(self, batch: list[tuple[Lane, list[_Entry]]]) -> BaseException | None:
        try:
            for lane, entries in batch:
                if entries[0].reset:
                    lane.store.length = 0
            logits = packed_forward(self.model, [lane.store for lane, _ in batch], [[e.token_id for e in es] for _, es in batch])
            offset = 0
            for lane, entries in batch:
                rows = GuardLogits(*(t[0, offset : offset + len(entries)] for t in (
                    logits.risk_level_logits, logits.category_logits, logits.query_risk_level_logits, logits.query_category_logits)))
                offset += len(entries)
                if not lane.closed:
                    lane.on_logits([e.meta for e in entries], rows)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            return exc
        return None

