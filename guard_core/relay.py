"""Relaying a model's own stream through the guard: one gate per choice, the original chunks held.

Adapters that hand their caller the model's own objects (LangChain message chunks, OpenAI chat
chunks and Responses events) cannot release re-cut text: a safe stream must reach the caller as
the very same chunks, tool-call and usage chunks included. ``StreamRelay`` holds each chunk until
every text it carries has been released by the gate of its choice (``StreamGate``), and releases
chunks unchanged and in order. The adapter only says which text a chunk carries for which choice
(a *key*: a chat choice index, a Responses (output, content) pair, 0 for single streams) and what
to do with each choice's decision (``on_decision``: on a block, raise or rewrite the held chunks
of that key; on a flag or review, attach the decision to a held chunk). With no Stream guard
configured, or for structured output (``whole``), each key's chunks are held until its text has
ended and it is judged whole.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .conversation import Conversation
from .moderator import Decision, Moderator
from .steps import Flow, Step, arun, run

if TYPE_CHECKING:
    from .gate import StreamGate

T = TypeVar("T")
Key = Hashable


@dataclass
class Held(Generic[T]):
    """A chunk waiting for its text: ``ends[key]`` is where that text ends in the key's stream.

    ``on_decision`` may replace ``item`` (a cut or annotated copy, or None to drop it); the relay
    then releases whatever ``item`` is left once every key allows.
    """

    item: T | None
    ends: dict[Key, int] = field(default_factory=dict)


DecisionHandler = Callable[[Key, Decision, "StreamRelay[Any]"], None]


class StreamRelay(Generic[T]):
    """Gates per key, the held chunks, and each key's final decision, for one streamed answer.

    ``feed`` / ``afeed`` take one chunk with the text it adds per key and return the chunks that
    may be delivered now; ``end`` / ``aend`` finish every gate. When a key is decided (its gate
    blocked, or its text ended), ``on_decision`` is called at once: for a block it raises (abort)
    or rewrites ``pending`` for that key, since the held text was never judged safe; text for a
    decided key must not be fed again (strip blocked choices from later chunks). ``first_gate`` (from a
    Stream prompt check) serves the first key, so a single stream is prefilled once.
    ``record_reviews=False`` leaves review items to a later check of the same answer (e.g. Gen's).
    ``whole=True`` (and a moderator without a Stream guard) holds each key's chunks until its text
    has ended and judges it whole (Gen if configured, else a Stream gate), as ``read`` makes it
    (structured output: what its JSON says, ``guard_core.structured.json_source_text``): nothing of
    it is released before.
    """

    def __init__(self, moderator: Moderator, conversation: Conversation, on_decision: DecisionHandler, *,
                 first_gate: StreamGate | None = None, request_id: str | None = None, record_reviews: bool = True,
                 whole: bool = False, read: Callable[[str], str] = str) -> None:
        self.moderator = moderator
        self.conversation = conversation
        self.request_id = request_id
        self.on_decision = on_decision
        self.record_reviews = record_reviews
        self.pending: deque[Held[T]] = deque()
        self.gates: dict[Key, StreamGate] = {}
        self.decisions: dict[Key, Decision] = {}
        self._spare = first_gate
        self._fed: dict[Key, int] = {}
        self._handed: dict[Key, int] = {}
        self._whole: dict[Key, str] | None = {} if whole or not moderator.has_stream else None  # each key's text
        self._read = read

    @property
    def blocked(self) -> dict[Key, Decision]:
        """The keys the policy has blocked, with their decisions."""
        return {k: d for k, d in self.decisions.items() if d.blocked}

    def released(self, key: Key) -> str:
        """The text of ``key`` the gate has judged safe so far (the held chunks may carry less of it)."""
        if self._whole is not None:
            decision = self.decisions.get(key)
            return self._whole.get(key, "") if decision is not None and not decision.blocked else ""
        gate = self.gates.get(key)
        return gate.delivered if gate is not None else ""

    def handed_out(self, key: Key) -> str:
        """The text of ``key`` in the chunks already returned to the caller."""
        return self.released(key)[: self._handed.get(key, 0)]

    def feed(self, item: T | None, texts: Iterable[tuple[Key, str]] = (), ended: Iterable[Key] = ()) -> list[T]:
        """Hold ``item`` (None: nothing to deliver) with its ``texts``; ``ended`` keys have no more text."""
        return run(self._feed(item, list(texts), list(ended)))

    async def afeed(self, item: T | None, texts: Iterable[tuple[Key, str]] = (), ended: Iterable[Key] = ()) -> list[T]:
        """``feed`` for asyncio."""
        return await arun(self._feed(item, list(texts), list(ended)))

    def end(self) -> list[T]:
        """The model's stream is over: finish every open gate and release what is left."""
        return run(self._feed(None, [], self._open_keys()))

    async def aend(self) -> list[T]:
        """``end`` for asyncio."""
        return await arun(self._feed(None, [], self._open_keys()))

    def _open_keys(self) -> list[Key]:
        return list(self.gates if self._whole is None else self._whole)

    def close(self) -> None:
        """Free every guard session (idempotent; also after an error or an early stop)."""
        for gate in [*self.gates.values(), *([self._spare] if self._spare else [])]:
            gate.close()
        self._spare = None

    def _feed(self, item: T | None, texts: list[tuple[Key, str]], ended: list[Key]) -> Flow[list[T]]:
        ends: dict[Key, int] = {}
        for key, text in texts:
            if key in self.decisions:
                raise RuntimeError(f"text fed for {key!r} after its decision; strip blocked choices from later chunks")
            self._fed[key] = self._fed.get(key, 0) + len(text)
            ends[key] = self._fed[key]
        self.pending.append(Held(item, ends))
        if self._whole is not None:
            for key, text in texts:
                self._whole[key] = self._whole.get(key, "") + text
            for key in dict.fromkeys(ended):
                if key in self._whole and key not in self.decisions:
                    (decision,) = yield from self.moderator.answers_flow(self.conversation, [self._read(self._whole[key])],
                                                                         self.request_id)
                    if decision is not None:  # None: no text, nothing held for it
                        self._decide(key, decision)
            return self._release()
        for key, text in texts:
            gate = yield from self._gate(key)
            if text and not gate.blocked:
                yield Step(lambda g=gate, t=text: g.push(t), lambda g=gate, t=text: g.apush(t))
            if gate.blocked:
                yield from self._settle(key, gate)
        for key in dict.fromkeys(ended):
            if key in self.decisions or key not in self.gates:
                continue
            gate = self.gates[key]
            yield Step(gate.finish, gate.afinish)
            yield from self._settle(key, gate)
        return self._release()

    def _gate(self, key: Key) -> Flow[StreamGate]:
        if key not in self.gates:
            spare, self._spare = self._spare, None
            self.gates[key] = spare if spare is not None else (yield from self.moderator.gate_flow(self.conversation))
        return self.gates[key]

    def _settle(self, key: Key, gate: StreamGate) -> Flow[None]:
        decision = yield from self.moderator.stream_decision_flow(gate, self.conversation, self.request_id,
                                                                  record_review=self.record_reviews)
        self._decide(key, decision)

    def _decide(self, key: Key, decision: Decision) -> None:
        self.decisions[key] = decision
        self.on_decision(key, decision, self)

    def _release(self) -> list[T]:
        out: list[T] = []
        while self.pending:
            held = self.pending[0]
            if any(k not in self.decisions and len(self.released(k)) < end for k, end in held.ends.items()):
                break
            self.pending.popleft()
            if held.item is not None:
                out.append(held.item)
                self._handed.update(held.ends)
        return out


def cut_text(pending: Sequence[Held[Any]], key: Key, keep: int, text_of: Callable[[Any], str],
             cut: Callable[[Any, int], Any]) -> None:
    """Cut every held chunk of ``key`` so that only the first ``keep`` characters of its text remain.

    ``text_of(item)`` is the key's text in an item; ``cut(item, n)`` returns the item with that
    text cut to ``n`` characters (or None to drop it). Used by ``on_decision`` handlers that end a
    blocked choice with a refusal after what was already released.
    """
    for held in pending:
        if key in held.ends and held.item is not None:
            text = text_of(held.item)
            start = held.ends[key] - len(text)
            held.item = cut(held.item, max(0, min(len(text), keep - start)))
            held.ends[key] = min(held.ends[key], max(start, keep))
