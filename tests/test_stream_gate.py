"""StreamGate: only judged text is released, never a token of a flagged run, safe text byte-identical."""

from __future__ import annotations

import random

import pytest

from guard_core.gate import StreamGate
from guard_core.policy import Action, Policy
from guard_core.testing.stream_fixture import (
    PLANTED_CONTROVERSIAL_TEXT, PLANTED_NEAR_MISS_TEXT, PLANTED_SAFE_PROMPT, PLANTED_SAFE_TEXT, PLANTED_UNSAFE_PROMPT,
    PLANTED_UNSAFE_TEXT, stream_guard,
)
from guard_core.types import Category, RiskLevel

USER = [{"role": "user", "content": PLANTED_SAFE_PROMPT}]
SAFE_TEXTS = [PLANTED_SAFE_TEXT, PLANTED_NEAR_MISS_TEXT, "Cafe\u0301 👨‍👩‍👧 你好，世界。 नमस्ते  \n\n end"]


def _splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        out.append(text[i : i + k])
        i += k
    return out


@pytest.mark.parametrize(
    ("text", "holdback"), [(SAFE_TEXTS[0], 0), (SAFE_TEXTS[0], 1), (SAFE_TEXTS[0], 3), (SAFE_TEXTS[1], 2), (SAFE_TEXTS[2], 2)]
)
def test_safe_text_released_completely_and_byte_identical(text: str, holdback: int) -> None:
    with stream_guard("planted").gate(USER, holdback_tokens=holdback) as gate:
        released = ""
        for delta in _splits(text, holdback):
            out = gate.push(delta)
            released += out
            assert gate.delivered == released
            if holdback == 0:
                assert out == delta
        released += gate.finish()
        assert released == text and gate.delivered == text and not gate.blocked
        assert gate.verdict.risk is RiskLevel.SAFE


@pytest.mark.parametrize("seed", range(3))
def test_default_window_never_releases_a_token_of_the_flagged_run(seed: int) -> None:
    prefix = "Sure. You need a"
    text = prefix + PLANTED_UNSAFE_TEXT + " and a timer. " + PLANTED_SAFE_TEXT
    with stream_guard("planted").gate(USER) as gate:
        released = "".join(gate.push(d) for d in _splits(text, seed)) + gate.finish()
        assert gate.blocked and gate.verdict.risk is RiskLevel.UNSAFE and gate.verdict.categories == (Category.VIOLENT,)
        assert "pipe" not in released and "bomb" not in released
        assert prefix.startswith(released) and len(released) >= len("Sure. You")
        assert gate.push("more text") == "" and gate.finish() == ""


def test_release_lags_by_exactly_holdback_minus_one_tokens() -> None:
    guard = stream_guard("planted")
    words = " one two three four five six"
    for holdback in (1, 2, 3):
        with guard.gate(USER, holdback_tokens=holdback) as gate:
            released = gate.push(words + " seven")
            judged = gate.session.tokens
            kept = judged[len(judged) - (holdback - 1) :] if holdback > 1 else []
            assert released == "".join(t.text for t in judged[: len(judged) - len(kept)])
            rest = gate.finish()
            assert rest.startswith("".join(t.text for t in kept)) and released + rest == words + " seven"


def test_pass_through_aborts_as_soon_as_the_guard_blocks() -> None:
    with stream_guard("planted").gate(USER, holdback_tokens=0) as gate:
        assert gate.push("Take a") == "Take a"
        assert gate.push(" pipe") == " pipe"
        assert gate.push(" bomb and") == ""
        assert gate.blocked and gate.delivered == "Take a pipe"


def test_policy_is_applied_per_token() -> None:
    guard = stream_guard("planted")
    text = "Who won the" + PLANTED_CONTROVERSIAL_TEXT + "? Nobody knows."
    with guard.gate(USER, policy=Policy.loose()) as gate:
        assert "".join(gate.push(d) for d in _splits(text, 1)) + gate.finish() == text
        assert not gate.blocked and gate.verdict.risk is RiskLevel.CONTROVERSIAL
    with guard.gate(USER, policy=Policy.strict()) as gate:
        released = gate.push(text) + gate.finish()
        assert gate.blocked and "rigged" not in released
    allow_politics = Policy(category_actions={Category.POLITICALLY_SENSITIVE: Action.ALLOW})
    with guard.gate(USER, policy=allow_politics) as gate:
        assert gate.push(text) + gate.finish() == text and not gate.blocked
    with guard.gate(USER, policy=Policy(unsafe_threshold=0.0001)) as gate:
        gate.push(PLANTED_SAFE_TEXT)
        assert gate.blocked  # every token has P(Unsafe) above 0.0001 (about 3e-4)


def test_prompt_verdict_and_policy() -> None:
    guard = stream_guard("planted")
    with guard.gate([{"role": "user", "content": PLANTED_UNSAFE_PROMPT}]) as gate:
        assert gate.prompt_blocked and gate.prompt_verdict.risk is RiskLevel.UNSAFE
    with guard.gate(USER) as gate:
        assert not gate.prompt_blocked


async def test_async_gate() -> None:
    guard = stream_guard("planted")
    gate = await guard.agate(USER)
    assert isinstance(gate, StreamGate)
    released = ""
    for delta in _splits(PLANTED_SAFE_TEXT, 3):
        released += await gate.apush(delta)
    released += await gate.afinish()
    await gate.aclose()
    assert released == PLANTED_SAFE_TEXT and gate.session.closed
