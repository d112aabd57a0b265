"""Bad input to a Stream session: a clear error, nothing taken, the session still usable."""

from __future__ import annotations

import pytest
import torch

from guard_core.stream import StreamGuard, StreamSession
from guard_core.stream_template import RESPONSE_LEAD
from guard_core.testing.stream_fixture import stream_guard
from guard_core.testing.tokenizer import FIRST_ADDED_ID, QWEN3_VOCAB_SIZE
from guard_core.types import RiskLevel

USER = [{"role": "user", "content": "Answer in any language you like."}]


@pytest.fixture(scope="module")
def guard() -> StreamGuard:
    return stream_guard("random")


def _ids(guard: StreamGuard, text: str) -> list[int]:
    """The response-token ids one-shot tokenization of the whole rendered answer gives."""
    ids, offsets = guard.tokens.encode_with_offsets(RESPONSE_LEAD + text)
    return [t for t, (_, end) in zip(ids, offsets) if end > len(RESPONSE_LEAD)]


def _judged(session: StreamSession, tokens: list) -> tuple[str, list[int]]:
    return "".join(t.text for t in tokens), [t.token_id for t in tokens]


def _p_unsafe(tokens: list) -> list[float]:
    return [t.probabilities[RiskLevel.UNSAFE] for t in tokens]


@pytest.mark.parametrize(("delta", "surrogate", "position"), [
    ("\ud800 then text", "D800", 0), ("ab\udfffcd", "DFFF", 2), ("\udc00 at the start", "DC00", 0),
    ("x\ud83d\ud83d\ude00", "D83D", 1),
])
def test_lone_surrogate_is_refused_and_nothing_is_lost(guard: StreamGuard, delta: str, surrogate: str, position: int) -> None:
    with guard.session(USER) as s:
        got = s.feed("Before the error, ")
        with pytest.raises(ValueError, match=rf"lone surrogate U\+{surrogate} at position {position} of the delta"):
            s.feed(delta)
        got += s.feed("and after it.") + s.finish()
        text = "Before the error, and after it."
        assert _judged(s, got) == (text, _ids(guard, text)) and s.text() == text


async def test_lone_surrogate_async_feed(guard: StreamGuard) -> None:
    async with await guard.asession(USER) as s:
        with pytest.raises(ValueError, match="lone surrogate"):
            await s.afeed("\udfff")
        got = await s.afeed("still fine") + await s.afinish()
        assert _judged(s, got)[0] == "still fine"


def test_surrogate_pair_split_across_deltas_is_joined(guard: StreamGuard) -> None:
    text = "Smile 😀 now, and 🙂 again"
    with guard.session(USER) as s, guard.session(USER) as whole:
        got = s.feed("Smile \ud83d") + s.feed("\ude00 now, and \ud83d\ude42") + s.feed(" again") + s.finish()
        ref = whole.feed(text) + whole.finish()
        assert _judged(s, got) == (text, _ids(guard, text)) and s.text() == text
        assert _p_unsafe(got) == pytest.approx(_p_unsafe(ref), abs=1e-5)


@pytest.mark.parametrize("high", ["\ud800", "\ud83d", "\udbff"])
def test_unpaired_high_surrogate_is_dropped_with_an_error(guard: StreamGuard, high: str) -> None:
    """A first half ending a delta may be completed by the next one, so the error comes with that call."""
    code = f"{ord(high):04X}"
    with guard.session(USER) as s:
        got = s.feed("one " + high)
        with pytest.raises(ValueError, match=rf"U\+{code} at the end of the previous delta.*next delta"):
            s.feed("two")
        got += s.feed("two")
        got += s.feed(high)
        with pytest.raises(ValueError, match=rf"U\+{code}.*bytes delta"):
            s.feed(b" three")
        got += s.feed(b" three")
        got += s.feed(" four" + high)
        with pytest.raises(ValueError, match=rf"U\+{code}.*response ends there"):
            s.finish()
        got += s.finish()
        assert _judged(s, got) == ("one two three four", _ids(guard, "one two three four"))


def test_str_delta_inside_an_unfinished_utf8_character_is_refused(guard: StreamGuard) -> None:
    with guard.session(USER) as s:
        got = s.feed(b"A \xf0\x9f")
        with pytest.raises(ValueError, match=r"2 byte\(s\) of an unfinished UTF-8 character are pending"):
            s.feed("B")
        got += s.feed(b"\x98\x80 C") + s.feed(" and str") + s.feed(b" then bytes") + s.finish()
        text = "A 😀 C and str then bytes"
        assert _judged(s, got) == (text, _ids(guard, text)) and s.text() == text


@pytest.mark.parametrize(("deltas", "text"), [
    ([b"ok \xff x"], "ok \ufffd x"),
    ([b"cut \xe2\x82"], "cut \ufffd"),
    ([b"surrogate \xed\xa0\x80 bytes"], "surrogate \ufffd\ufffd\ufffd bytes"),
])
def test_invalid_utf8_bytes_read_as_replacement_characters(guard: StreamGuard, deltas: list[bytes], text: str) -> None:
    with guard.session(USER) as s:
        got = [t for d in deltas for t in s.feed(d)] + s.finish()
        assert _judged(s, got) == (text, _ids(guard, text)) and s.text() == text


def test_control_characters_are_ordinary_text(guard: StreamGuard) -> None:
    text = "a\x01b\x07c\x1b[31m red \u200b\ufeff end"
    with guard.session(USER) as s:
        got = [t for ch in text for t in s.feed(ch)] + s.finish()
        assert _judged(s, got) == (text, _ids(guard, text))


@pytest.mark.parametrize("delta", ["b\x00c", b"b\x00c"], ids=["str", "bytes"])
def test_nul_is_refused_as_in_every_text_the_guard_reads_and_the_session_goes_on(guard: StreamGuard, delta: str | bytes) -> None:
    with guard.session(USER) as s:
        got = s.feed("a ")
        with pytest.raises(ValueError, match="contains NUL bytes"):
            s.feed(delta)
        got += s.feed("b c") + s.finish()
        assert _judged(s, got)[0] == s.text() == "a b c"


@pytest.mark.parametrize("delta", [5, None, 1.5, ["text"], {"content": "x"}])
def test_a_delta_that_is_not_text_is_a_type_error(guard: StreamGuard, delta: object) -> None:
    with guard.session(USER) as s:
        with pytest.raises(TypeError, match="must be str or UTF-8 bytes"):
            s.feed(delta)  # type: ignore[arg-type]
        assert _judged(s, s.feed(bytearray(b"bytes-like ")) + s.feed(memoryview(b"too")) + s.finish())[0] == "bytes-like too"


def _added_ids(guard: StreamGuard) -> list[int]:
    return sorted(guard.tokens.tokenizer.added_tokens_decoder)


@pytest.mark.parametrize("bad", [
    151645, 151667, 151668, FIRST_ADDED_ID, FIRST_ADDED_ID + 26, QWEN3_VOCAB_SIZE - 1, QWEN3_VOCAB_SIZE, 10**12, -1,
])
def test_feed_ids_refuses_control_and_foreign_ids(guard: StreamGuard, bad: int) -> None:
    good = _ids(guard, "Hello world")
    with guard.session(USER) as s, guard.session(USER) as clean:
        with pytest.raises(ValueError, match=rf"token id {bad} \(position 1\) is not a text token"):
            s.feed_ids([good[0], bad])
        assert s.tokens == [] and s.text() == ""
        got, ref = s.feed_ids(good) + s.finish(), clean.feed_ids(good)
        assert _judged(s, got) == ("Hello world", good) and _p_unsafe(got) == pytest.approx(_p_unsafe(ref), abs=1e-5)


def test_feed_ids_refuses_every_added_token(guard: StreamGuard) -> None:
    added = _added_ids(guard)
    assert len(added) == 26 and added[0] == FIRST_ADDED_ID
    with guard.session(USER) as s:
        for tid in added:
            with pytest.raises(ValueError, match=f"token id {tid} "):
                s.feed_ids([tid])
        assert _judged(s, s.feed_ids(_ids(guard, "fine")))[0] == "fine"


@pytest.mark.parametrize(("bad", "kind"), [("5", "str"), (True, "bool"), (1.0, "float"), (None, "NoneType"), ([5], "list")])
def test_feed_ids_refuses_ids_that_are_not_integers(guard: StreamGuard, bad: object, kind: str) -> None:
    with guard.session(USER) as s:
        with pytest.raises(TypeError, match=f"token ids must be integers, got {kind}"):
            s.feed_ids([bad])  # type: ignore[list-item]
        assert _judged(s, s.feed_ids(torch.tensor(_ids(guard, "tensor ids"))))[0] == "tensor ids"


@pytest.mark.parametrize("bad", [5, "abc", b"abc", None, {9707: 1}, {9707}])
def test_feed_ids_needs_a_sequence(guard: StreamGuard, bad: object) -> None:
    with guard.session(USER) as s, pytest.raises(TypeError, match="sequence of token ids"):
        s.feed_ids(bad)  # type: ignore[arg-type]


def test_feed_ids_keeps_characters_split_over_tokens(guard: StreamGuard) -> None:
    text = "emoji 👨‍👩‍👧 and 漢字"
    ids = _ids(guard, text)
    with guard.session(USER) as s:
        got = [t for tid in ids for t in s.feed_ids([tid])] + s.finish()
        assert _judged(s, got) == (text, ids) and s.text() == text


def test_finish_twice_and_calls_after_finish_or_close(guard: StreamGuard) -> None:
    s = guard.session(USER)
    tail = s.feed("The end") + s.finish()
    assert _judged(s, tail)[0] == "The end" and s.finished
    assert s.finish() == []
    with pytest.raises(RuntimeError, match="finished"):
        s.feed("more")
    with pytest.raises(RuntimeError, match="finished"):
        s.feed_ids([9707])
    s.close()
    s.close()
    for call in (lambda: s.feed("x"), lambda: s.feed_ids([9707]), s.finish):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert s.text() == "The end"


def test_text_and_token_ids_do_not_mix(guard: StreamGuard) -> None:
    with guard.session(USER) as s:
        s.feed("text first")
        with pytest.raises(RuntimeError, match="not both"):
            s.feed_ids([9707])
    with guard.session(USER) as s:
        s.feed_ids([9707])
        with pytest.raises(RuntimeError, match="not both"):
            s.feed("then text")
        assert _judged(s, s.finish())[0] == ""


def test_an_empty_response_finishes_without_tokens(guard: StreamGuard) -> None:
    with guard.session(USER) as s:
        assert s.feed("") == [] and s.feed(b"") == [] and s.finish() == []
        assert s.text() == "" and s.verdict.risk is RiskLevel.SAFE
