"""Coalescing concurrent single calls into batched ones, without waiting for company.

A server guards many requests at once; each asks ``moderate(one conversation)``. One model call
at a time (the guard's lock) would serve them one by one, so the last waits for all the others.
``Coalescer`` lets the caller that finds the model free run at once with whatever is queued, and
everyone who arrives while that batch runs joins the next one: an idle guard adds no delay, a
busy guard turns N waiting calls into one batched forward (the same idea as the Stream
scheduler's packed step). Results are handed back to each caller in order. When a batch of
several raises, each of its calls is run again alone, so one caller's bad input or fault is that
caller's error and never fails the others (``KeyboardInterrupt`` and the like reach everyone).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Call(Generic[In, Out]):
    item: In
    wake: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    result: Out | None = None
    error: BaseException | None = None


class Coalescer(Generic[In, Out]):
    """Runs ``batch(items)`` for calls made concurrently from any number of threads.

    The caller that finds no batch running runs one (with everything queued, up to
    ``max_batch``); when it is done, the first caller still queued is woken to run the next, so
    nobody serves other callers longer than one batch. ``batch`` must return one result per item,
    in order.
    """

    def __init__(self, batch: Callable[[Sequence[In]], Sequence[Out]], *, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._batch = batch
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Call[In, Out]] = []
        self._running = False
        self.batches = 0

    def __call__(self, item: In) -> Out:
        """The result for ``item``, computed alone or together with concurrent calls."""
        call: _Call[In, Out] = _Call(item)
        with self._lock:
            self._queue.append(call)
            leads, self._running = not self._running, True
        if not leads:
            try:
                call.wake.wait()
            except BaseException:  # Ctrl-C while queued: leave the queue, and pass the turn on if it was ours
                self._abandon(call)
                raise
        if not call.finished:  # this caller runs the next batch, which starts with its own call
            self._run_batch()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _abandon(self, call: _Call[In, Out]) -> None:
        """Take a call whose caller stopped waiting out of the queue; if it had been woken to run the
        next batch, wake the one after it (or end the run), so no later caller waits forever."""
        with self._lock:
            if call not in self._queue:
                return  # already in a batch, which finishes it
            designated = call.wake.is_set()
            self._queue.remove(call)
            if designated and self._queue:
                self._queue[0].wake.set()
            elif designated:
                self._running = False

    def _results(self, calls: Sequence[_Call[In, Out]]) -> list[Out]:
        results = list(self._batch([c.item for c in calls]))
        if len(results) != len(calls):
            raise RuntimeError(f"a batch of {len(calls)} returned {len(results)} results")
        return results

    def _run_alone(self, calls: Sequence[_Call[In, Out]]) -> None:
        """After a failed batch: each call on its own, so a failure stays with the call that caused it."""
        for c in calls:
            try:
                (c.result,) = self._results([c])
            except BaseException as exc:
                c.error = exc

    def _run_batch(self) -> None:
        with self._lock:
            taken, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        try:
            results = self._results(taken)
        except Exception as exc:
            if len(taken) == 1:
                taken[0].error = exc
            else:
                self._run_alone(taken)
        except BaseException as exc:  # interrupts and exits reach every caller of the batch
            for c in taken:
                c.error = exc
        else:
            for c, result in zip(taken, results):
                c.result = result
        with self._lock:
            self.batches += 1
            for c in taken:
                c.finished = True
                c.wake.set()
            if self._queue:
                self._queue[0].wake.set()
            else:
                self._running = False
