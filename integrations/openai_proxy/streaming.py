"""OpenAI streams through the core ``StreamRelay``: where text lives in a chunk, and how to end it.

The relay holds every upstream item until the text it carries has been judged and hands back
the very same objects, so a safe stream reaches the reader unchanged (tool-call deltas, usage
chunks, logprobs and unknown fields included). These classes only say which text an item
carries for which choice (chat: the choice index; Responses: the (output, content) pair) and what
a decision does: ``abort`` raises ``UnsafeContentError``; ``rewrite`` cuts the blocked choice's
held items to the text its gate released and appends a refusal and a ``content_filter`` ending;
a flag or review decision rides on the choice's last item under ``qwen3guard``. ``done`` turns
True once nothing more is wanted from upstream, so the caller closes it and stops paying.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from openai.types.chat import ChatCompletionChunk

from guard_core import Action, Decision
from guard_core.relay import Held, StreamRelay, cut_text

from . import chunks
from .errors import UnsafeContentError
from .exchange import OpenAIGuard, Request, note

Key = Hashable
_FULL_TEXT_EVENTS = frozenset({
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "response.completed", "response.incomplete", "response.failed",
})


class GuardedItems:
    """The shared part: the relay, the decisions, and the feed / end / close entry points."""

    def __init__(self, guard: OpenAIGuard, request: Request, prompt_gate: Any, prompt: Decision | None) -> None:
        self.guard = guard
        self.request = request
        self.prompt_decision = prompt
        self.relay: StreamRelay[Any] = StreamRelay(guard.moderator, request.conversation, self._decided, first_gate=prompt_gate)
        self.done = False

    @property
    def decisions(self) -> dict[Key, Decision]:
        """The response decision of every choice / text part decided so far."""
        return dict(self.relay.decisions)

    def feed(self, item: Any) -> list[Any]:
        """Account for one upstream item; return the items that may be delivered now."""
        return self.relay.feed(*self._accept(item))

    async def afeed(self, item: Any) -> list[Any]:
        """``feed`` for asyncio."""
        return await self.relay.afeed(*self._accept(item))

    def end(self) -> list[Any]:
        """Upstream is exhausted (or ``done``): judge every open tail and deliver what is left."""
        return self.relay.end()

    async def aend(self) -> list[Any]:
        """``end`` for asyncio."""
        return await self.relay.aend()

    def close(self) -> None:
        """Free the guard sessions (idempotent; also after an error or an early stop)."""
        self.relay.close()

    def _decided(self, key: Key, decision: Decision, relay: StreamRelay[Any]) -> None:
        if decision.blocked:
            if self.guard.on_unsafe == "abort":
                raise UnsafeContentError(decision, delivered=relay.handed_out(key), choice_index=self._index(key))
            self._rewrite(key, decision, relay.released(key))
        elif decision.action is not Action.ALLOW:
            last = next((h for h in reversed(relay.pending) if key in h.ends and h.item is not None), None)
            if last is not None:
                last.item = chunks.annotated(last.item, note(response=decision, index=self._index(key)))

    def _accept(self, item: Any) -> tuple[Any, list[tuple[Key, str]], list[Key]]:
        raise NotImplementedError

    def _rewrite(self, key: Key, decision: Decision, released: str) -> None:
        raise NotImplementedError

    def _index(self, key: Key) -> int:
        raise NotImplementedError


class ChatItems(GuardedItems):
    """Chat completion chunks; each choice index has its own gate.

    A rewritten choice ends with the refusal and ``finish_reason="content_filter"`` while other
    choices carry on; upstream is given up once every choice has ended and one was blocked.
    """

    def __init__(self, guard: OpenAIGuard, request: Request, prompt_gate: Any, prompt: Decision | None) -> None:
        super().__init__(guard, request, prompt_gate, prompt)
        self._template: ChatCompletionChunk | None = None

    def _index(self, key: Key) -> int:
        return int(key)  # type: ignore[call-overload]

    def _accept(self, chunk: ChatCompletionChunk) -> tuple[Any, list[tuple[Key, str]], list[Key]]:
        self._template = chunk
        blocked = self.relay.blocked
        kept = [c for c in chunk.choices if c.index not in blocked]
        item = chunk if len(kept) == len(chunk.choices) else (chunk.model_copy(update={"choices": kept}) if kept else None)
        decided = self.relay.decisions
        texts = [(c.index, c.delta.content or "") for c in kept if c.index not in decided or c.delta.content]
        ended = [c.index for c in kept if c.finish_reason is not None and c.index not in decided]
        return item, texts, ended

    def _rewrite(self, key: Key, decision: Decision, released: str) -> None:
        index = self._index(key)
        cut_text(self.relay.pending, key, len(released), lambda c: chunks.choice_text(c, index),
                 lambda c, keep: chunks.cut_choice(c, index, keep))
        refusal = chunks.refusal_chunks(self._template, index, self.guard.moderator.refusal_after(released),
                                        note(response=decision, index=index))
        self.relay.pending.extend(Held(c) for c in refusal)
        self.done = len(self.relay.decisions) >= self.request.n


class ResponsesItems(GuardedItems):
    """Responses API events; each (output item, content part) of output text has its own gate.

    A block in ``rewrite`` mode ends the whole response: pending text is cut to what the gates
    released, events that would repeat the full text are dropped, and the stream ends with the
    refusal, the part's and item's done events and ``response.incomplete`` (``content_filter``).
    """

    def __init__(self, guard: OpenAIGuard, request: Request, prompt_gate: Any, prompt: Decision | None) -> None:
        super().__init__(guard, request, prompt_gate, prompt)
        self._base: Any = None
        self._sequence = 0
        self._item_ids: dict[Key, str] = {}
        self._done_items: list[Any] = []

    def _index(self, key: Key) -> int:
        return key[0]  # type: ignore[index,no-any-return]

    def _accept(self, event: Any) -> tuple[Any, list[tuple[Key, str]], list[Key]]:
        self._sequence = max(self._sequence, getattr(event, "sequence_number", 0) or 0)
        kind = getattr(event, "type", None)
        if kind in ("response.created", "response.in_progress"):
            self._base = event.response
        elif kind == "response.output_item.done":
            self._done_items.append(event.item)
        elif kind in ("response.output_text.delta", "response.output_text.done"):
            key = (event.output_index, event.content_index)
            self._item_ids[key] = event.item_id
            text = event.delta if kind == "response.output_text.delta" else ""
            return event, [(key, text)], [key] if kind == "response.output_text.done" else []
        return event, [], []

    def _rewrite(self, key: Key, decision: Decision, released: str) -> None:
        kept: list[Held[Any]] = []
        for held in self.relay.pending:
            event = held.item
            if getattr(event, "type", None) == "response.output_text.delta":
                part = (event.output_index, event.content_index)
                limit = len(released) if part == key else len(self.relay.released(part))
                keep = max(0, min(len(event.delta), limit - (held.ends[part] - len(event.delta))))
                if keep:
                    kept.append(Held(event if keep == len(event.delta) else event.model_copy(update={"delta": event.delta[:keep], "logprobs": []})))
            elif event is not None and getattr(event, "type", None) not in _FULL_TEXT_EVENTS:
                kept.append(Held(event))
        output_index, content_index = key  # type: ignore[misc]
        events = chunks.responses_refusal_events(
            self._base, item_id=self._item_ids[key], output_index=output_index, content_index=content_index,
            delivered=released, text=self.guard.moderator.refusal_after(released), prior=self._done_items,
            sequence=self._sequence + 1, note=note(response=decision, index=output_index))
        self.relay.pending.clear()
        self.relay.pending.extend([*kept, *(Held(e) for e in events)])
        self.done = True


def stream_items(guard: OpenAIGuard, request: Request, prompt_gate: Any, prompt: Decision | None) -> GuardedItems:
    """The moderator of a stream of ``request``'s endpoint."""
    kind = ChatItems if request.endpoint == "chat" else ResponsesItems
    return kind(guard, request, prompt_gate, prompt)
