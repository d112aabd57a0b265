"""OpenAI streams through the core ``StreamRelay``: where text lives in a chunk, and how to end it.

The relay holds every upstream item until the text it carries has been judged and hands back
the very same objects, so a safe stream reaches the reader unchanged (tool-call deltas, usage
chunks, logprobs and unknown fields included). These classes only say which text an item
carries for which choice (chat: the choice index, content and refusal; Responses: the (output,
content) pair of output text or a refusal) and what a decision does. A Responses event that
carries a part's whole text (``output_text.done``, parts, items, ``response.completed``) feeds
whatever of it no delta carried, and a whole text that contradicts the deltas, or text for a
choice or part that is already done, is refused (``MalformedReplyError``). On a decision:
``abort`` raises ``UnsafeContentError``; ``rewrite`` cuts the blocked choice's held items to the
text its gate released and appends a refusal and a ``content_filter`` ending; a flag or review
decision rides on the choice's last item under ``qwen3guard``. ``done`` turns True once nothing
more is wanted from upstream, so the caller closes it and stops paying.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Any

from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response

from guard_core import Action, Decision
from guard_core.relay import Held, StreamRelay, cut_text
from guard_core.structured import json_source_text

from . import chunks
from .errors import MalformedReplyError, UnsafeContentError
from .exchange import OpenAIGuard, Request, note

Key = Hashable
#: Events that say a part, item or response is done: after a block they would claim text that was cut.
_FULL_TEXT_EVENTS = frozenset({
    "response.output_text.done", "response.refusal.done", "response.content_part.done", "response.output_item.done",
    "response.completed", "response.incomplete", "response.failed",
})


class GuardedItems:
    """The shared part: the relay, the decisions, and the feed / end / close entry points."""

    #: The response a Responses stream announced (upstream stores the answer under its id, and its
    #: message items under theirs); None and empty for chat.
    _base: Any = None
    _item_ids: Mapping[Key, str] = MappingProxyType({})

    def __init__(self, guard: OpenAIGuard, request: Request, prompt_gate: Any, prompt: Decision | None) -> None:
        self.guard = guard
        self.request = request
        self.prompt_decision = prompt
        self.relay: StreamRelay[Any] = StreamRelay(guard.moderator, request.conversation, self._decided, first_gate=prompt_gate,
                                                   whole=request.structured, read=json_source_text)
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
            self.guard.refuse_history(self._base, self._item_ids.values())
            if self.guard.on_unsafe == "abort":
                raise UnsafeContentError(decision, delivered=relay.handed_out(key), choice_index=self._index(key),
                                         output="choice" if self.request.endpoint == "chat" else "output")
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
        read = chunks.chat_choices(chunk)  # the upstream's faults are raised before anything is held
        blocked, decided = self.relay.blocked, self.relay.decisions
        texts: list[tuple[Key, str]] = []
        ended: list[Key] = []
        for index, text, finished in read:
            if not 0 <= index < self.request.n:
                raise MalformedReplyError(f"the upstream sent choice {index}, but the request asked for {self.request.n}")
            if index in blocked:
                continue
            if index in decided:
                if text:
                    raise MalformedReplyError(f"the upstream sent more text for choice {index} after its finish_reason")
                continue
            texts.append((index, text))
            if finished:
                ended.append(index)
        if not read:
            return chunk, texts, ended
        self._template = chunk
        kept = [c for c in chunk.choices if c.index not in blocked]
        item = chunk if len(kept) == len(chunk.choices) else (chunk.model_copy(update={"choices": kept}) if kept else None)
        return item, texts, ended

    def _rewrite(self, key: Key, decision: Decision, released: str) -> None:
        index = self._index(key)
        cut_text(self.relay.pending, key, len(released), lambda c: chunks.choice_text(c, index),
                 lambda c, keep: chunks.cut_choice(c, index, keep))
        refusal = chunks.refusal_chunks(self._template, index, self.guard.moderator.refusal_after(released),
                                        note(response=decision, index=index), kind=self.request.refusal_kind)
        self.relay.pending.extend(Held(c) for c in refusal)
        self.done = len(self.relay.decisions) >= self.request.n


class ResponsesItems(GuardedItems):
    """Responses API events; each (output item, content part) of output text or refusal has its own gate.

    A block in ``rewrite`` mode ends the whole response: pending text is cut to what the gates
    released, events that would repeat the full text are dropped, and the stream ends with the
    refusal, the part's and item's done events and ``response.incomplete`` (``content_filter``).
    """

    def __init__(self, guard: OpenAIGuard, request: Request, prompt_gate: Any, prompt: Decision | None) -> None:
        super().__init__(guard, request, prompt_gate, prompt)
        self._base: Any = None
        self._sequence = 0
        self._item_ids: dict[Key, str] = {}
        self._kinds: dict[Key, chunks.PartKind] = {}
        self._texts: dict[Key, str] = {}  # each part's text as fed to its gate
        self._announced: set[tuple[Any, ...]] = set()  # ("response",), ("item", i), ("part", key) the caller was told of
        self._done_items: list[Any] = []

    def _index(self, key: Key) -> int:
        return key[0]  # type: ignore[index,no-any-return]

    def _accept(self, event: Any) -> tuple[Any, list[tuple[Key, str]], list[Key]]:
        """Deltas feed their part; whole texts (done events, parts, items, whole responses) feed
        whatever of them no delta carried, so text that arrives only there is judged too."""
        kind = chunks.event_type(event)
        sequence = getattr(event, "sequence_number", None)
        if isinstance(sequence, int):
            self._sequence = max(self._sequence, sequence)
        texts: list[tuple[Key, str]] = []
        delta = chunks.event_delta(event)
        found, final = ([delta], False) if delta is not None else chunks.event_texts(event)
        for text in found:
            extra = self._extra(text, whole=delta is None, kind=kind)
            if extra is not None:
                texts.append((text.part, extra))
        if kind in ("response.created", "response.in_progress") and isinstance(event.response, Response):
            self._base = event.response
        elif kind == "response.output_item.done":
            self._done_items.append(event)
        if (begun := _announcement(event)) is not None:
            self._announced.add(begun)
        return event, texts, [t.part for t in found] if final else []

    def _extra(self, found: chunks.PartText, *, whole: bool, kind: str) -> str | None:
        """What of ``found`` its part's gate has not been fed yet (None: the part is decided, nothing to feed)."""
        part, text = found.part, found.text
        if isinstance(found.item_id, str):
            self._item_ids.setdefault(part, found.item_id)
        self._kinds.setdefault(part, found.kind)
        seen = self._texts.get(part, "")
        where = f"output {part[0]} part {part[1]}"
        if not whole:
            extra = text
        elif text.startswith(seen):
            extra = text[len(seen):]
        elif seen.startswith(text):
            extra = ""  # a prefix of judged text (e.g. trailing whitespace trimmed)
        else:
            raise MalformedReplyError(f"the upstream's {kind} event has text for {where} that contradicts the deltas "
                                      "it streamed before")
        if part in self.relay.decisions:
            if extra:
                raise MalformedReplyError(f"the upstream sent more text for {where} after that part was done")
            return None
        self._texts[part] = seen + extra
        return extra

    def _rewrite(self, key: Key, decision: Decision, released: str) -> None:
        kept: list[Held[Any]] = []
        for held in self.relay.pending:
            event = held.item
            if event is None:
                continue
            delta = chunks.event_delta(event)
            if delta is not None:
                part, text = delta.part, delta.text
                limit = len(released) if part == key else len(self.relay.released(part))
                keep = max(0, min(len(text), limit - (held.ends.get(part, 0) - len(text))))
                if keep:
                    kept.append(Held(event if keep == len(text) else event.model_copy(update={"delta": text[:keep], "logprobs": []})))
            elif event.type in _FULL_TEXT_EVENTS or any(t.text for t in chunks.event_texts(event)[0]):
                self._announced.discard(_announcement(event))  # dropped: the caller is not told of it after all
            else:
                kept.append(Held(event))
        output_index, content_index = key  # type: ignore[misc]
        # A part whose deltas the caller was or will be shown is open to it, even where the upstream
        # never announced it (shims send deltas alone): its opening events must not come after them.
        shown = {d.part for held in kept if (d := chunks.event_delta(held.item)) is not None}
        shown |= {part for part in self._texts if self.relay.handed_out(part)}
        # Items finished before, if every text in them was judged safe (what the caller was or may be shown).
        prior = [e.item for e in self._done_items if e.output_index != output_index
                 and all(self.relay.released(t.part).startswith(t.text) for t in chunks.item_texts(e.item, e.output_index))]
        events = chunks.responses_refusal_events(
            self._base, item_id=self._item_ids.get(key) or chunks.new_id("msg"), output_index=output_index,
            content_index=content_index, delivered=released, text=self.guard.moderator.refusal_after(released), prior=prior,
            sequence=self._sequence + 1, note=note(response=decision, index=output_index), model=self.request.model,
            opened=("response",) in self._announced or bool(shown),
            item_opened=("item", output_index) in self._announced or any(p[0] == output_index for p in shown),
            part_opened=("part", key) in self._announced or key in shown,
            kind="refusal" if self.request.structured else self._kinds.get(key, "output_text"))
        self.relay.pending.clear()
        self.relay.pending.extend([*kept, *(Held(e) for e in events)])
        self.done = True


def _announcement(event: Any) -> tuple[Any, ...] | None:
    """What a Responses event tells the caller has begun: the response, an item or a part."""
    kind = event.type
    if kind in ("response.created", "response.in_progress"):
        return ("response",)
    if kind == "response.output_item.added":
        return ("item", getattr(event, "output_index", None))
    if kind == "response.content_part.added":
        return ("part", (getattr(event, "output_index", None), getattr(event, "content_index", None)))
    return None


def stream_items(guard: OpenAIGuard, request: Request, prompt_gate: Any, prompt: Decision | None) -> GuardedItems:
    """The moderator of a stream of ``request``'s endpoint."""
    kind = ChatItems if request.endpoint == "chat" else ResponsesItems
    return kind(guard, request, prompt_gate, prompt)
