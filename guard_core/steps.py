"""Writing a moderation flow once and running it from blocking or asyncio code.

Every guard call exists twice: blocking (``moderate``, ``push``, ``submit``) and for asyncio
(``amoderate``, ``apush``, ``asubmit``). Copying each decision into a sync and an async twin is
how adapters drifted apart, so a flow is written once, as a generator that yields ``Step``s:
``run`` performs each step in its blocking form, ``arun`` awaits its async form, and both send
the result back into the flow (or throw the error back in, so the flow's ``try``/``finally``
cleans up the same way). ``Moderator`` and ``StreamRelay`` are built this way; their public
sync and async methods are one line each, in the manner of langchain-core's callback manager.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Step(Generic[T]):
    """One guard call, in its blocking and its asyncio form (both must do the same thing)."""

    call: Callable[[], T]
    acall: Callable[[], Awaitable[T]]


Flow = Generator[Step[Any], Any, T]


def run(flow: Flow[T]) -> T:
    """Drive ``flow`` with the blocking form of each step; returns what the flow returns."""
    try:
        step = next(flow)
        while True:
            try:
                result = step.call()
            except BaseException as exc:  # handed to the flow, which re-raises or handles it
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def arun(flow: Flow[T]) -> T:
    """Drive ``flow`` awaiting the asyncio form of each step; returns what the flow returns."""
    try:
        step = next(flow)
        while True:
            try:
                result = await step.acall()
            except BaseException as exc:  # handed to the flow, which re-raises or handles it
                step = flow.throw(exc)
            else:
                step = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def value(result: T) -> Step[T]:
    """A step that is already done (keeps flows uniform where one branch needs no guard call)."""

    async def ready() -> T:
        return result

    return Step(lambda: result, ready)


def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Step[Any]:
    """A step for a blocking function; its async form runs it in a worker thread."""
    return Step(lambda: function(*args, **kwargs), lambda: asyncio.to_thread(function, *args, **kwargs))
