"""What the LangChain tests share: reading a guarded stream to its end or its block, and recording events."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from guard_core import GuardViolation
from integrations.langchain import GUARD_EVENT


def collect(stream: Iterable[Any], pick: Callable[[Any], Any] = lambda chunk: chunk) -> tuple[list[Any], GuardViolation | None]:
    """What a consumer got (``pick`` of each chunk) before the stream ended or the guard stopped it."""
    got: list[Any] = []
    try:
        for chunk in stream:
            got.append(pick(chunk))
    except GuardViolation as exc:
        return got, exc
    return got, None


async def acollect(stream: AsyncIterable[Any], pick: Callable[[Any], Any] = lambda chunk: chunk) -> tuple[list[Any], GuardViolation | None]:
    """``collect`` for an async stream."""
    got: list[Any] = []
    try:
        async for chunk in stream:
            got.append(pick(chunk))
    except GuardViolation as exc:
        return got, exc
    return got, None


class Recorder(BaseCallbackHandler):
    """A callback handler that keeps every ``qwen3guard_verdict`` event payload."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == GUARD_EVENT:
            self.events.append(data)
