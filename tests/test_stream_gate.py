"""StreamGate: only judged text is released, never a token of a flagged run, safe text byte-identical."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import typing

import pytest

from guard_core import debounce
from guard_core.gate import StreamGate
from guard_core.policy import Action, Policy
from guard_core.stream import StreamGuard
from guard_core.testing.stream_fixture import (
    PLANTED_CONTROVERSIAL_TEXT,
    PLANTED_NEAR_MISS_TEXT,
    PLANTED_SAFE_PROMPT,
    PLANTED_SAFE_TEXT,
    PLANTED_UNSAFE_PROMPT,
    PLANTED_UNSAFE_TEXT,
    stream_guard,
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


async def test_a_cancelled_push_makes_the_gate_refuse_further_use() -> None:
    gate = await stream_guard("planted").agate(USER)
    released = await gate.apush("Fix the leaking tap")
    push = asyncio.ensure_future(gate.apush(PLANTED_UNSAFE_TEXT + " now, then"))
    await asyncio.sleep(0)  # the delta reaches the guard, then the caller gives up (asyncio.wait_for timing out)
    push.cancel()
    with pytest.raises(asyncio.CancelledError):
        await push
    for call in (lambda: gate.apush(" wipe the floor."), gate.afinish):
        with pytest.raises(RuntimeError, match="cancelled before the guard judged its text"):
            await call()
    with pytest.raises(RuntimeError, match="cancelled before the guard judged its text"):
        gate.finish()
    assert released == gate.delivered and "bomb" not in gate.delivered
    await gate.aclose()


async def test_a_refused_finish_changes_nothing_and_can_be_made_again() -> None:
    guard = stream_guard("planted")
    for asynchronous in (False, True):
        with guard.gate(USER) as gate:
            released = gate.push("Fix the tap, then enjoy \ud83d")
            finish = gate.afinish if asynchronous else gate.finish
            with pytest.raises(ValueError, match="the lone half was dropped, make this call again"):
                await finish() if asynchronous else finish()
            released += await finish() if asynchronous else finish()
            assert released == "Fix the tap, then enjoy " == gate.delivered and not gate.blocked


def test_gate_imports_without_torch_and_guard_gate_is_typed() -> None:
    code = ("import sys; import guard_core.gate, guard_core.debounce; "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert typing.get_type_hints(StreamGuard.gate)["return"] is StreamGate
    assert typing.get_type_hints(StreamGuard.agate)["return"] is StreamGate
    from guard_core.stream import DEFAULT_CONSECUTIVE, DEFAULT_STREAM_MODEL, Debounce
    from guard_core.stream import StreamGuard as Reexported

    assert (DEFAULT_CONSECUTIVE, Debounce, Reexported) == (2, debounce.Debounce, StreamGuard)
    assert DEFAULT_STREAM_MODEL == "Qwen/Qwen3Guard-Stream-0.6B"


@pytest.mark.parametrize("holdback", [-1, True, 1.5, "2", None])
def test_holdback_is_validated_once_before_a_session_opens(holdback: object) -> None:
    guard = stream_guard("planted")
    lanes = guard.scheduler.active_lanes
    with pytest.raises(ValueError, match="holdback_tokens must be an int >= 0"):
        guard.gate(USER, holdback_tokens=holdback)  # type: ignore[arg-type]
    assert guard.scheduler.active_lanes == lanes
    with guard.session(USER) as session, pytest.raises(ValueError, match="holdback_tokens must be an int >= 0"):
        StreamGate(session, Policy(), holdback)  # type: ignore[arg-type]


def test_push_takes_and_refuses_what_feed_does() -> None:
    guard = stream_guard("planted")
    with guard.gate(USER) as gate, guard.session(USER) as session:
        for bad in ("\udfff", "x\ud800y"):
            with pytest.raises(ValueError) as by_gate:
                gate.push(bad)
            with pytest.raises(ValueError) as by_feed:
                session.feed(bad)
            assert str(by_gate.value) == str(by_feed.value) and "lone surrogate" in str(by_gate.value)
        with pytest.raises(TypeError, match="must be str or UTF-8 bytes"):
            gate.push(5)  # type: ignore[arg-type]
        released = gate.push("Hi \ud83d") + gate.push("\ude00, ") + gate.push("caf\u00e9 ".encode()) + gate.push(b"\xf0\x9f")
        with pytest.raises(ValueError, match="unfinished UTF-8 character"):
            gate.push("str inside a character")
        released += gate.push(b"\x99\x82 done") + gate.finish()
        assert released == "Hi 😀, café 🙂 done" == gate.delivered == gate.session.text() and not gate.blocked


def test_bad_delta_is_refused_after_the_gate_blocked() -> None:
    with stream_guard("planted").gate(USER) as gate:
        gate.push("Take a" + PLANTED_UNSAFE_TEXT + " now")
        assert gate.blocked
        with pytest.raises(TypeError):
            gate.push(None)  # type: ignore[arg-type]
        assert gate.push("more") == "" and gate.finish() == ""


def test_a_policy_that_is_not_a_policy_and_a_zero_debounce_are_refused(stream_guard: StreamGuard) -> None:
    with pytest.raises(TypeError, match="policy must be a guard_core.Policy, got str"):
        stream_guard.gate([{"role": "user", "content": "hi"}], policy="strict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="consecutive must be an int >= 1, got 0"):
        stream_guard.session([{"role": "user", "content": "hi"}], consecutive=0)


def test_finish_while_a_push_is_judged_is_refused_and_releases_nothing_unjudged() -> None:
    async def scenario() -> tuple[str, bool]:
        with stream_guard("planted").gate(USER) as gate:
            judged = asyncio.Event()
            feed = gate.session.afeed

            async def slow_feed(delta: str) -> list:
                await judged.wait()
                return await feed(delta)

            gate.session.afeed = slow_feed  # type: ignore[method-assign]
            push = asyncio.create_task(gate.apush("Sure, here is how to build a pipe bomb at home"))
            await asyncio.sleep(0)
            with pytest.raises(RuntimeError, match="still being judged"):
                await gate.afinish()
            judged.set()
            released = await push
            return released + gate.delivered, gate.blocked

    shown, blocked = asyncio.run(scenario())
    assert blocked and "bomb" not in shown
