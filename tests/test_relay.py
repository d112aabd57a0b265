"""StreamRelay: the model's own chunks held until judged, one gate per key, decisions handed to the adapter."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, replace
from typing import Any

import pytest

from guard_core import Action, Decision, Moderator, Policy, RiskLevel
from guard_core.conversation import from_text
from guard_core.relay import Held, StreamRelay, cut_text
from guard_core.stream import StreamGuard
from guard_core.testing.stream_fixture import PLANTED_CONTROVERSIAL_TEXT, PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT

ASK = from_text(PLANTED_SAFE_PROMPT)


@dataclass(frozen=True)
class Chunk:
    """A model chunk: its identity must survive the relay (it is handed back, not rebuilt)."""

    key: int
    text: str
    serial: int


def chunked(text: str, key: int, rng: random.Random) -> list[Chunk]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(6, len(text) - 1)))
    return [Chunk(key, text[a:b], i) for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(text)]))]


def cutting(decisions: list[tuple[int, Decision]]) -> Any:
    """An adapter's handler: record decisions, cut a blocked key's held chunks to what was released."""
    def decided(key: int, decision: Decision, relay: StreamRelay[Any]) -> None:
        decisions.append((key, decision))
        if decision.blocked:
            cut_text(relay.pending, key, len(relay.released(key)), lambda c: c.text,
                     lambda c, keep: replace(c, text=c.text[:keep]) if keep else None)
            relay.pending.append(Held(Chunk(key, "[refused]", -1)))
    return decided


@pytest.mark.parametrize("seed", range(4))
def test_safe_chunks_come_back_unchanged_and_in_order(stream_guard: StreamGuard, seed: int) -> None:
    chunks = chunked(PLANTED_SAFE_TEXT, 0, random.Random(seed))
    decisions: list[tuple[int, Decision]] = []
    relay = StreamRelay(Moderator(stream_guard=stream_guard), ASK, cutting(decisions))
    out = [c for chunk in chunks for c in relay.feed(chunk, [(0, chunk.text)])] + relay.end()
    relay.close()
    assert all(a is b for a, b in zip(out, chunks)) and len(out) == len(chunks)
    assert [(k, d.action) for k, d in decisions] == [(0, Action.ALLOW)]


@pytest.mark.parametrize("seed", range(4))
def test_a_blocked_key_never_hands_out_its_flagged_tokens_and_the_others_carry_on(stream_guard: StreamGuard, seed: int) -> None:
    rng = random.Random(seed)
    unsafe, safe = chunked("Sure, take a pipe bomb and run far away.", 0, rng), chunked(PLANTED_SAFE_TEXT, 1, rng)
    merged = sorted(unsafe + safe, key=lambda c: (c.serial, c.key))
    decisions: list[tuple[int, Decision]] = []
    relay = StreamRelay(Moderator(stream_guard=stream_guard), ASK, cutting(decisions))

    async def drive() -> list[Chunk]:
        out: list[Chunk] = []
        for chunk in merged:
            if chunk.key not in relay.decisions:
                out += await relay.afeed(chunk, [(chunk.key, chunk.text)])
        out += await relay.aend()
        await asyncio.sleep(0)
        relay.close()
        return out

    out = asyncio.run(drive())
    text0 = "".join(c.text for c in out if c.key == 0)
    assert "pipe" not in text0 and "bomb" not in text0 and text0.endswith("[refused]")
    assert "".join(c.text for c in out if c.key == 1) == PLANTED_SAFE_TEXT
    assert dict((k, d.action) for k, d in decisions) == {0: Action.BLOCK, 1: Action.ALLOW}
    assert all(g.session.closed for g in relay.gates.values())


def test_items_without_text_wait_their_turn_and_decided_keys_take_no_more_text(stream_guard: StreamGuard) -> None:
    decisions: list[tuple[int, Decision]] = []
    moderator = Moderator(stream_guard=stream_guard, policy=Policy(actions={RiskLevel.CONTROVERSIAL: Action.FLAG}))
    relay = StreamRelay(moderator, ASK, cutting(decisions))
    first = Chunk(0, f"A{PLANTED_CONTROVERSIAL_TEXT} claim", 0)
    assert relay.feed(first, [(0, first.text)]) == []
    usage = Chunk(0, "", 1)
    assert relay.feed(usage) == [], "a text-less chunk (tool call, usage) keeps its place behind held text"
    assert relay.feed(None, [(0, "")], ended=[0]) == [first, usage]
    assert decisions[-1][1].action is Action.FLAG
    with pytest.raises(RuntimeError, match="after its decision"):
        relay.feed(Chunk(0, "more", 2), [(0, "more")])
    relay.close()
