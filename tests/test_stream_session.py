"""Stream sessions: incremental == one-shot on real multilingual text, planted verdicts, concurrency, long contexts."""

from __future__ import annotations

import asyncio
import csv
import gc
import gzip
import random
import threading
import weakref
from pathlib import Path

import pytest
import torch

from guard_core.stream import StreamGuard
from guard_core.stream_template import RESPONSE_LEAD, encode_stream_prompt
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

USER = [{"role": "user", "content": "Answer in any language you like."}]
EXTRA_TEXTS = [
    "Family: 👨‍👩‍👧‍👦, flags 🇯🇵🇸🇦, skin tones 👋🏽 and keycaps 1️⃣!",
    "Cafe\u0301 na\u0308ive re\u0301sume\u0301 \u1100\u1161\u11a8 e\u0301\u0323 — decomposed marks",
    "  spaces\t\ttabs\n\n\nnewlines\r\n end  ",
]


@pytest.fixture(scope="module")
def texts(datasets_dir: Path) -> list[str]:
    with gzip.open(datasets_dir / "xsafety" / "xsafety.csv.gz", "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(7)
    picked = []
    for lang in ("en", "zh", "ar", "hi", "ja"):
        pool = [r["prompt"] for r in rows if r["lang"] == lang]
        picked += rng.sample(pool, 3)
    return picked + EXTRA_TEXTS


def _one_shot(guard: StreamGuard, text: str) -> tuple[list[int], torch.Tensor]:
    prompt = encode_stream_prompt(guard.tokens, USER)
    ids, offsets = guard.tokens.encode_with_offsets(RESPONSE_LEAD + text)
    first = next(i for i, (_, end) in enumerate(offsets) if end > len(RESPONSE_LEAD))
    with torch.inference_mode():
        out = guard.model(torch.tensor([prompt.ids + ids]))
    probs = torch.softmax(out.risk_level_logits[0, len(prompt.ids) + first :], dim=-1)
    return ids[first:], probs


def _split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, max(1, len(text) // 3))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_feed_equals_one_shot_forward_on_multilingual_text(texts: list[str]) -> None:
    guard = stream_guard("random")
    order = guard.labels.risk
    rng = random.Random(0)
    for text in texts:
        ref_ids, ref_probs = _one_shot(guard, text)
        with guard.session(USER) as s:
            got = []
            for delta in _split(text, rng):
                got += s.feed(delta)
            got += s.finish()
        assert "".join(t.text for t in got) == text
        assert [t.token_id for t in got] == ref_ids, text
        probs = torch.tensor([[t.probabilities[level] for level in order] for t in got])
        assert torch.allclose(probs, ref_probs, atol=1e-4), text
        assert [t.start for t in got[1:]] == [t.end for t in got[:-1]] and got[-1].end == len(text)


def test_utf8_bytes_split_mid_character(texts: list[str]) -> None:
    guard = stream_guard("random")
    text = texts[4] + EXTRA_TEXTS[0]
    data = text.encode("utf-8")
    with guard.session(USER) as s:
        got = []
        for i in range(0, len(data), 3):
            got += s.feed(data[i : i + 3])
        got += s.finish()
    assert "".join(t.text for t in got) == text
    assert [t.token_id for t in got] == _one_shot(guard, text)[0]


def test_feed_ids_matches_text_feed() -> None:
    guard = stream_guard("random")
    text = EXTRA_TEXTS[0] + " 你好"
    ids = _one_shot(guard, text)[0]
    with guard.session(USER) as a, guard.session(USER) as b:
        by_ids = [t for i in range(0, len(ids), 2) for t in a.feed_ids(ids[i : i + 2])]
        by_text = b.feed(text) + b.finish()
    assert [t.token_id for t in by_ids] == [t.token_id for t in by_text]
    assert "".join(t.text for t in by_ids) == text
    for x, y in zip(by_ids, by_text):
        assert abs(x.probabilities[RiskLevel.UNSAFE] - y.probabilities[RiskLevel.UNSAFE]) < 1e-4


def test_prompt_verdicts_of_planted_model() -> None:
    guard = stream_guard("planted")
    with guard.session([{"role": "user", "content": PLANTED_UNSAFE_PROMPT}]) as s:
        v = s.prompt_verdict
        assert (v.role, v.risk, v.categories) == ("prompt", RiskLevel.UNSAFE, (Category.VIOLENT,))
        assert v.probabilities[RiskLevel.UNSAFE] > 0.9 and abs(sum(v.probabilities.values()) - 1) < 1e-5
    with guard.session([{"role": "user", "content": PLANTED_SAFE_PROMPT}]) as s:
        assert s.prompt_verdict.risk is RiskLevel.SAFE and s.prompt_verdict.categories == ()
    history = [{"role": "user", "content": PLANTED_UNSAFE_PROMPT}, {"role": "assistant", "content": "No."},
               {"role": "user", "content": "Then how do I bake bread?"}]
    with guard.session(history) as s:
        assert s.prompt_verdict.risk is RiskLevel.UNSAFE  # the context carries the earlier turn


def test_response_flips_exactly_at_the_planted_token() -> None:
    guard = stream_guard("planted")
    text = "Sure. First get a" + PLANTED_UNSAFE_TEXT + " and then more words."
    with guard.session([{"role": "user", "content": PLANTED_SAFE_PROMPT}]) as s:
        seen = []
        for ch in text:
            for tok in s.feed(ch):
                seen.append((tok.text, s.verdict.risk))
        seen += [(t.text, s.verdict.risk) for t in s.finish()]
        flip = next(i for i, (_, risk) in enumerate(seen) if risk is RiskLevel.UNSAFE)
        assert seen[flip][0] == " bomb" and seen[flip - 1][0] == " pipe"
        assert all(risk is RiskLevel.SAFE for _, risk in seen[:flip])
        assert s.verdict.categories == (Category.VIOLENT,) and s.verdict.role == "response"
        assert s.tokens[flip - 1].risk is RiskLevel.UNSAFE and s.tokens[flip - 1].category is Category.VIOLENT


def test_debounce_single_token_and_configurable_count() -> None:
    guard = stream_guard("planted")
    with guard.session([{"role": "user", "content": "hi"}]) as s:
        toks = s.feed(PLANTED_NEAR_MISS_TEXT) + s.finish()
        assert [t.text for t in toks if t.risk is not RiskLevel.SAFE] == [" pipe"]
        assert s.verdict.risk is RiskLevel.SAFE
    with guard.session([{"role": "user", "content": "hi"}], consecutive=1) as s:
        s.feed(PLANTED_NEAR_MISS_TEXT)
        assert s.verdict.risk is RiskLevel.UNSAFE
    with guard.session([{"role": "user", "content": "hi"}], consecutive=3) as s:
        s.feed("x" + PLANTED_UNSAFE_TEXT + " y")
        s.finish()
        assert s.verdict.risk is RiskLevel.SAFE
    with guard.session([{"role": "user", "content": "hi"}]) as s:
        s.feed("Who won the" + PLANTED_CONTROVERSIAL_TEXT + "?")
        s.finish()
        assert (s.verdict.risk, s.verdict.categories) == (RiskLevel.CONTROVERSIAL, (Category.POLITICALLY_SENSITIVE,))


def _run_session(guard: StreamGuard, text: str, seed: int) -> list:
    rng = random.Random(seed)
    with guard.session([{"role": "user", "content": f"question {seed}"}]) as s:
        out = []
        for delta in _split(text, rng):
            out += s.feed(delta)
        return out + s.finish()


def test_sessions_isolated_under_thread_concurrency() -> None:
    guard = stream_guard("random")
    texts = [f"Stream number {i}: " + EXTRA_TEXTS[i % 3] * 2 for i in range(8)]
    alone = [_run_session(guard, t, i) for i, t in enumerate(texts)]
    results: list = [None] * 8
    steps_before = guard.scheduler.steps
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _run_session(guard, texts[i], i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, results):
        assert [t.token_id for t in a] == [t.token_id for t in b]
        for x, y in zip(a, b):
            assert abs(x.probabilities[RiskLevel.UNSAFE] - y.probabilities[RiskLevel.UNSAFE]) < 1e-4
    assert guard.scheduler.steps - steps_before < sum(len(r) for r in results)  # tokens were batched


async def test_sessions_isolated_under_asyncio() -> None:
    guard = stream_guard("planted")

    async def run(i: int) -> tuple:
        s = await guard.asession([{"role": "user", "content": PLANTED_UNSAFE_PROMPT if i % 2 else PLANTED_SAFE_PROMPT}])
        async with s:
            text = PLANTED_SAFE_TEXT + (PLANTED_UNSAFE_TEXT if i % 2 else "")
            for k in range(0, len(text), 5):
                await s.afeed(text[k : k + 5])
            await s.afinish()
            return s.prompt_verdict.risk, s.verdict.risk

    results = await asyncio.gather(*(run(i) for i in range(6)))
    for i, (prompt_risk, response_risk) in enumerate(results):
        expected = RiskLevel.UNSAFE if i % 2 else RiskLevel.SAFE
        assert prompt_risk is expected and response_risk is expected


async def test_a_session_cancelled_during_its_prefill_frees_its_lane() -> None:
    """``asyncio.wait_for`` timing out, a client gone: the error (kept by a reporter here) must not keep the cache."""
    guard = stream_guard("planted")
    lanes_before = guard.scheduler.active_lanes
    task = asyncio.create_task(guard.asession(USER))
    await asyncio.sleep(0)  # the task now waits for its prefill
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as kept:
        await task
    assert kept.value is not None and guard.scheduler.active_lanes == lanes_before


def test_closed_session_frees_its_memory() -> None:
    guard = stream_guard("random")
    lanes_before = guard.scheduler.active_lanes
    s = guard.session(USER)
    s.feed("some text to fill the cache " * 5)
    store = s._lane.store
    assert store.nbytes() > 0 and guard.scheduler.active_lanes == lanes_before + 1
    s.close()
    assert store.nbytes() == 0 and guard.scheduler.active_lanes == lanes_before
    with pytest.raises(RuntimeError, match="closed"):
        s.feed("more")
    forgotten = guard.session(USER)
    forgotten.feed("abandoned without close")
    ref, store = weakref.ref(forgotten), forgotten._lane.store
    del forgotten
    gc.collect()
    assert ref() is None and store.nbytes() == 0 and guard.scheduler.active_lanes == lanes_before


def test_long_conversation_keeps_moderating_past_the_context() -> None:
    guard = StreamGuard(stream_guard("planted").model, stream_guard("planted").tokens, max_context=96)
    long_prompt = "Tell me a very long story. " * 60 + PLANTED_UNSAFE_PROMPT
    with guard.session([{"role": "user", "content": long_prompt}]) as s:
        assert s.prompt_verdict.risk is RiskLevel.UNSAFE
        assert s.context_tokens <= 96
        filler = "The quick brown fox jumps over the lazy dog. " * 30
        toks = s.feed(filler)
        assert s.context_tokens <= 96 and s.verdict.risk is RiskLevel.SAFE
        toks += s.feed("Then" + PLANTED_UNSAFE_TEXT + " again") + s.finish()
        assert "".join(t.text for t in toks) == filler + "Then" + PLANTED_UNSAFE_TEXT + " again"
        assert s.verdict.risk is RiskLevel.UNSAFE and s.context_tokens <= 96


def test_a_long_prompt_is_judged_whole_not_only_the_end_the_session_keeps() -> None:
    planted = stream_guard("planted")
    guard = StreamGuard(planted.model, planted.tokens, max_context=96)
    padding = " Tell me a very long story." * 60  # pushes the request out of the part the session keeps

    async def prompt_risk(content: str) -> RiskLevel:
        async with await guard.asession([{"role": "user", "content": content}]) as s:
            return s.prompt_verdict.risk

    with guard.session([{"role": "user", "content": PLANTED_UNSAFE_PROMPT + padding}]) as s:
        assert s.prompt_verdict.risk is RiskLevel.UNSAFE and s.context_tokens <= 96
    assert asyncio.run(prompt_risk(PLANTED_UNSAFE_PROMPT + padding)) is RiskLevel.UNSAFE
    with guard.session([{"role": "user", "content": PLANTED_SAFE_PROMPT + padding}]) as s:
        assert s.prompt_verdict.risk is RiskLevel.SAFE


def test_the_text_tokenizer_is_built_once_per_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cloning the 150k vocabulary takes about a second: the guard and all its sessions share one clone."""
    from guard_core import retokenize, tokenization

    clones: list[str] = []
    real = tokenization.Tokenizer

    class CountingTokenizer:
        @staticmethod
        def from_str(spec: str):
            clones.append(spec)
            return real.from_str(spec)

    monkeypatch.setattr(tokenization, "Tokenizer", CountingTokenizer)
    monkeypatch.setattr(retokenize, "Tokenizer", CountingTokenizer, raising=False)
    base = stream_guard("random")
    guard = StreamGuard(base.model, base.tokens.tokenizer)
    for _ in range(2):
        with guard.session(USER) as s:
            assert "".join(t.text for t in s.feed("two sessions, ") + s.finish()) == "two sessions, "
    assert len(clones) == 1


@pytest.mark.parametrize(("max_context", "reason"), [
    (32, "max_context must be an int from 64 to"), ("100", "max_context must be an int from 64 to"),
    (10**9, "the model has that many positions"),
])
def test_a_context_the_model_cannot_hold_is_refused(max_context: object, reason: str) -> None:
    guard = stream_guard("planted")
    with pytest.raises(ValueError, match=reason):
        StreamGuard(guard.model, guard.tokens, max_context=max_context)  # type: ignore[arg-type]
