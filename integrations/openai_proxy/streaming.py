"""Moderating a stream of chat chunks or Responses events while it is read.

A ``StreamModerator`` sits between an upstream stream and its reader and knows nothing about
HTTP: ``feed`` takes one upstream item and returns the items that may be delivered now, ``end``
is called when upstream is exhausted, and ``done`` turns True once nothing more from upstream is
wanted (so the caller closes it and stops paying for tokens). The client wrapper drives it from
``openai.Stream``; the proxy drives it from its own upstream connection.

Hold-back is ``StreamGate``'s (one gate per choice or text part); this module never judges text.
It holds back whole items instead of re-slicing text: an item is delivered, unchanged, once every
text it carries has been released by its gate. A safe stream therefore reaches the reader as the
very same chunks (delayed by the hold-back window, not re-cut), and tool-call deltas, usage
chunks, logprobs and unknown fields pass through as they came. Only when a gate blocks does the
moderator write: ``abort`` raises ``UnsafeContentError`` at once; ``rewrite`` cuts the blocked
choice's pending items to the text its gate released, then appends a refusal and a
``content_filter`` ending.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from guard_core import Verdict
from guard_core.gate import StreamGate

from . import chunks
from .moderation import ChoiceGates, Moderator, annotation

T = TypeVar("T")
Key = Hashable
#: Op on one gate: (key, text to push, whether the key's text ends here).
_Op = tuple[Key, str, bool]


class _Entry:
    """An item waiting for its text to be released: ``ends[key]`` is where its text ends in that key's gate."""

    __slots__ = ("item", "ends")

    def __init__(self, item: Any, ends: dict[Key, int]) -> None:
        self.item = item
        self.ends = ends


class StreamModerator(Generic[T]):
    """The shared state machine; subclasses say where text lives in an item and how to rewrite."""

    def __init__(self, moderator: Moderator, gates: ChoiceGates) -> None:
        self.moderator = moderator
        self.gates = gates
        self.done = False
        self._pending: deque[_Entry] = deque()
        self._fed: defaultdict[Key, int] = defaultdict(int)
        self._released: defaultdict[Key, int] = defaultdict(int)
        self._finished: set[Key] = set()
        self._blocked: dict[Key, Verdict] = {}

    @property
    def prompt_verdict(self) -> Verdict:
        """The Stream guard's verdict on the prompt (it let the request through)."""
        return self.gates.prompt_verdict

    @property
    def verdicts(self) -> dict[Key, Verdict]:
        """The response verdict of every choice / text part seen so far."""
        return {key: gate.verdict for key, gate in self.gates.opened().items()}

    def feed(self, item: T) -> list[T]:
        """Account for one upstream item; return the items that may be delivered now."""
        for key, text, final in self._accept(item):
            gate = self.gates.get(key)
            if text:
                gate.push(text)
            if final:
                gate.finish()
            self._settle(key, gate, final)
        return self._drain()

    async def afeed(self, item: T) -> list[T]:
        """``feed`` for asyncio (the guard steps never block the event loop)."""
        for key, text, final in self._accept(item):
            gate = await self.gates.aget(key)
            if text:
                await gate.apush(text)
            if final:
                await gate.afinish()
            self._settle(key, gate, final)
        return self._drain()

    def end(self) -> list[T]:
        """Upstream is exhausted (or ``done``): judge every open tail and deliver what is left."""
        for key, gate in self._open_gates():
            gate.finish()
            self._settle(key, gate, True)
        return self._drain()

    async def aend(self) -> list[T]:
        """``end`` for asyncio."""
        for key, gate in self._open_gates():
            await gate.afinish()
            self._settle(key, gate, True)
        return self._drain()

    def close(self) -> None:
        """Free the guard sessions (idempotent; also after an error or an early stop)."""
        self.gates.close()

    async def aclose(self) -> None:
        """``close`` for asyncio."""
        self.gates.close()

    def _open_gates(self) -> list[tuple[Key, StreamGate]]:
        return [(k, g) for k, g in self.gates.opened().items() if k not in self._finished and k not in self._blocked]

    def _settle(self, key: Key, gate: StreamGate, final: bool) -> None:
        if final:
            self._finished.add(key)
        if not gate.blocked or key in self._blocked:
            return
        verdict = gate.verdict
        self._blocked[key] = verdict
        if self.moderator.on_unsafe == "abort":
            raise self.moderator.refuse(verdict, delivered=gate.delivered[: self._released[key]], choice_index=self._index(key))
        self._rewrite(key, verdict, gate.delivered)

    def _drain(self) -> list[T]:
        out: list[T] = []
        while self._pending:
            entry = self._pending[0]
            if any(key not in self._blocked and len(self.gates.get(key).delivered) < end for key, end in entry.ends.items()):
                break
            self._pending.popleft()
            for key, end in entry.ends.items():
                self._released[key] = end
            if entry.item is not None:
                out.append(entry.item)
        return out

    def _accept(self, item: T) -> list[_Op]:
        raise NotImplementedError

    def _rewrite(self, key: Key, verdict: Verdict, delivered: str) -> None:
        raise NotImplementedError

    def _index(self, key: Key) -> int:
        raise NotImplementedError


class ChatStreamModerator(StreamModerator[ChatCompletionChunk]):
    """Chat completion chunks; each choice index has its own gate.

    A rewritten choice ends with the refusal and ``finish_reason="content_filter"`` while other
    choices carry on; upstream is given up (``done``) once every one of the ``n`` choices has
    ended and at least one was blocked.
    """

    def __init__(self, moderator: Moderator, gates: ChoiceGates, n: int = 1) -> None:
        super().__init__(moderator, gates)
        self.n = n
        self._template: ChatCompletionChunk | None = None

    def _index(self, key: Key) -> int:
        return int(key)  # type: ignore[call-overload]

    def _accept(self, chunk: ChatCompletionChunk) -> list[_Op]:
        self._template = chunk
        kept = [c for c in chunk.choices if c.index not in self._blocked]
        ops: list[_Op] = []
        ends: dict[Key, int] = {}
        for choice in kept:
            text = choice.delta.content or ""
            if text and choice.index in self._finished:
                raise ValueError(f"upstream sent text for choice {choice.index} after its finish_reason")
            self._fed[choice.index] += len(text)
            ends[choice.index] = self._fed[choice.index]
            ops.append((choice.index, text, choice.finish_reason is not None and choice.index not in self._finished))
        if kept or not chunk.choices:
            self._pending.append(_Entry(chunk if len(kept) == len(chunk.choices) else chunk.model_copy(update={"choices": kept}), ends))
        return ops

    def _rewrite(self, key: Key, verdict: Verdict, delivered: str) -> None:
        cut = len(delivered)
        for entry in self._pending:
            if key in entry.ends and entry.item is not None:
                text = chunks.chunk_choice_text(entry.item, self._index(key))
                start = entry.ends[key] - len(text)
                keep = max(0, min(len(text), cut - start))
                entry.item = chunks.cut_choice(entry.item, self._index(key), keep)
                entry.ends[key] = start + keep
        note = annotation(response=verdict, index=self._index(key))
        for chunk in chunks.refusal_chunks(self._template, self._index(key), self.moderator.refusal_text(delivered), note):
            self._pending.append(_Entry(chunk, {}))
        self.done = len(self._finished | set(self._blocked)) >= self.n


_FULL_TEXT_EVENTS = frozenset({
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "response.completed", "response.incomplete", "response.failed",
})


class ResponsesStreamModerator(StreamModerator[ResponseStreamEvent]):
    """Responses API events; each (output item, content part) of output text has its own gate.

    A block in ``rewrite`` mode ends the whole response: pending text is cut to what the gates
    released, events that would repeat the full text are dropped, and the stream ends with the
    refusal, the part's and item's done events and ``response.incomplete`` (reason
    ``content_filter``).
    """

    def __init__(self, moderator: Moderator, gates: ChoiceGates) -> None:
        super().__init__(moderator, gates)
        self._base: Response | None = None
        self._sequence = 0
        self._item_ids: dict[Key, str] = {}
        self._done_items: list[Any] = []

    def _index(self, key: Key) -> int:
        return key[0]  # type: ignore[index,no-any-return]

    def _accept(self, event: ResponseStreamEvent) -> list[_Op]:
        self._sequence = max(self._sequence, getattr(event, "sequence_number", 0) or 0)
        ops: list[_Op] = []
        ends: dict[Key, int] = {}
        if event.type in ("response.created", "response.in_progress"):
            self._base = event.response
        elif event.type == "response.output_item.done":
            self._done_items.append(event.item)
        elif event.type in ("response.output_text.delta", "response.output_text.done"):
            key = (event.output_index, event.content_index)
            self._item_ids[key] = event.item_id
            text = event.delta if event.type == "response.output_text.delta" else ""
            if text and key in self._finished:
                raise ValueError(f"upstream sent text for output {key} after its output_text.done")
            self._fed[key] += len(text)
            ends[key] = self._fed[key]
            ops.append((key, text, event.type == "response.output_text.done" and key not in self._finished))
        self._pending.append(_Entry(event, ends))
        return ops

    def _rewrite(self, key: Key, verdict: Verdict, delivered: str) -> None:
        kept: deque[_Entry] = deque()
        for entry in self._pending:
            event = entry.item
            if event.type == "response.output_text.delta":
                part = (event.output_index, event.content_index)
                limit = len(delivered) if part == key else len(self.gates.get(part).delivered)
                start = entry.ends[part] - len(event.delta)
                keep = max(0, min(len(event.delta), limit - start))
                if keep:
                    update = {} if keep == len(event.delta) else {"delta": event.delta[:keep], "logprobs": []}
                    kept.append(_Entry(event.model_copy(update=update), {}))
            elif event.type not in _FULL_TEXT_EVENTS:
                kept.append(_Entry(event, {}))
        self._pending = kept
        output_index, content_index = key  # type: ignore[misc]
        events = chunks.responses_refusal_events(
            self._base, item_id=self._item_ids[key], output_index=output_index, content_index=content_index,
            delivered=delivered, text=self.moderator.refusal_text(delivered), prior=self._done_items,
            sequence=self._sequence + 1, note=annotation(response=verdict, index=output_index),
        )
        self._pending.extend(_Entry(e, {}) for e in events)
        self.done = True


class ReplayStream(Generic[T]):
    """A stream the guard wrote itself (the refusal to a blocked prompt), with the moderator's interface."""

    def __init__(self, items: list[T], prompt_verdict: Verdict) -> None:
        self._items = items
        self.prompt_verdict = prompt_verdict
        self.verdicts: dict[Key, Verdict] = {}
        self.done = True

    def feed(self, item: T) -> list[T]:
        """Never called: there is no upstream."""
        raise RuntimeError("a replayed stream has no upstream")

    async def afeed(self, item: T) -> list[T]:
        """Never called: there is no upstream."""
        raise RuntimeError("a replayed stream has no upstream")

    def end(self) -> list[T]:
        """All the items, once."""
        items, self._items = self._items, []
        return items

    async def aend(self) -> list[T]:
        """``end`` for asyncio."""
        return self.end()

    def close(self) -> None:
        """Nothing to free."""

    async def aclose(self) -> None:
        """Nothing to free."""
