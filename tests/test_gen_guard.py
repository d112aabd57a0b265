"""GenGuard end to end on the trained tiny checkpoint: real from_pretrained, forward and generate()."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch

from guard_core import GenGuard, GuardUnavailableError, Policy, RiskLevel
from guard_core.gen_parser import parse_answer
from guard_core.gen_template import render_pieces
from guard_core.messages import MAX_MESSAGE_CHARS, normalize_messages
from guard_core.testing import GEN_CASES, UNPARSEABLE_CASE
from guard_core.testing.cases import UNSAFE_PROMPT
from guard_core.windows import plan_windows


def test_trained_cases_give_their_exact_verdicts(gen_guard: GenGuard) -> None:
    verdicts = gen_guard.moderate_batch([case.as_messages for case in GEN_CASES])
    for case, verdict in zip(GEN_CASES, verdicts):
        assert verdict.risk is case.risk, case.messages
        assert verdict.categories == case.categories
        assert verdict.role == ("response" if case.messages[-1][0] == "assistant" else "prompt")
        assert verdict.refusal == (("Refusal: Yes" in case.output) if verdict.role == "response" else None)
        assert max(verdict.probabilities, key=verdict.probabilities.__getitem__) is case.risk
        assert abs(sum(verdict.probabilities.values()) - 1.0) < 1e-5
        assert verdict.error is None and verdict.model


def _upstream_greedy_answer(guard: GenGuard, messages: list[dict[str, str]]) -> str:
    """What upstream's README loop answers: the checkpoint's chat template, then greedy ``generate()``."""
    enc = guard.tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = guard.model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=151643)
    return guard.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_one_pass_verdict_equals_greedy_generate_on_the_trained_cases(gen_guard: GenGuard) -> None:
    verdicts = gen_guard.moderate_batch([case.as_messages for case in GEN_CASES])
    for case, verdict in zip(GEN_CASES, verdicts):
        greedy = _upstream_greedy_answer(gen_guard, case.as_messages)
        assert greedy == case.output, "the fixture answers its trained cases exactly"
        expected = parse_answer(greedy, response=verdict.role == "response")
        assert (verdict.risk, verdict.categories, verdict.refusal) == (expected.risk, expected.categories, expected.refusal)
        assert greedy.startswith(verdict.raw_output), "the one-pass answer is the start of the greedy answer"


def test_unparseable_output_goes_through_plain_generate_and_fails_closed(
    gen_guard: GenGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []
    generate = gen_guard.model.generate

    def recording_generate(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(gen_guard.model, "generate", recording_generate)
    verdict = gen_guard.moderate(UNPARSEABLE_CASE.as_messages)
    prompt_ids = gen_guard.tokens.encode_pieces(render_pieces(normalize_messages(UNPARSEABLE_CASE.as_messages)))
    assert [c["input_ids"][0].tolist() for c in calls] == [prompt_ids], "one plain generate() from the whole prompt"
    assert "cache" not in calls[0]
    assert verdict.raw_output == _upstream_greedy_answer(gen_guard, UNPARSEABLE_CASE.as_messages) == UNPARSEABLE_CASE.output
    assert (verdict.error_kind, verdict.risk, verdict.probabilities) == ("unparseable", RiskLevel.UNSAFE, {})
    assert Policy().blocks(verdict) and Policy(on_error=RiskLevel.SAFE).blocks(verdict), "unparseable never fails open"


def test_batch_equals_one_by_one(gen_guard: GenGuard) -> None:
    conversations = [case.as_messages for case in GEN_CASES]
    batched = gen_guard.moderate_batch(conversations)
    single = [gen_guard.moderate(c) for c in conversations]
    for a, b in zip(batched, single):
        assert (a.risk, a.categories, a.refusal) == (b.risk, b.categories, b.refusal)
        for level in RiskLevel:
            assert a.probabilities[level] == pytest.approx(b.probabilities[level], abs=1e-4)


def test_openai_content_parts_are_moderated_like_a_string(gen_guard: GenGuard) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": UNSAFE_PROMPT}]}]
    assert gen_guard.moderate(parts).risk is RiskLevel.UNSAFE


def test_async_api_matches_sync_and_does_not_block_the_loop(gen_guard: GenGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    in_model, loop_ran = threading.Event(), threading.Event()
    waits: list[bool] = []
    forward = gen_guard.model.forward

    def forward_once_the_loop_ran(*args, **kwargs):
        in_model.set()
        waits.append(loop_ran.wait(timeout=30))  # a blocked event loop never gets to set it
        return forward(*args, **kwargs)

    monkeypatch.setattr(gen_guard.model, "forward", forward_once_the_loop_ran)

    async def run() -> list:
        async def ticker() -> None:
            while not in_model.is_set():
                await asyncio.sleep(0.001)
            loop_ran.set()  # the loop runs while the model is inside its forward

        task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(gen_guard.amoderate(c.as_messages) for c in GEN_CASES[:4]))
        await task
        return results

    results = asyncio.run(run())
    assert [v.risk for v in results] == [c.risk for c in GEN_CASES[:4]]
    assert waits and all(waits)


def test_threads_share_one_guard_safely(gen_guard: GenGuard) -> None:
    results: dict[int, RiskLevel] = {}

    def work(i: int) -> None:
        results[i] = gen_guard.moderate(GEN_CASES[i % len(GEN_CASES)].as_messages).risk

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: GEN_CASES[i % len(GEN_CASES)].risk for i in range(8)}


def test_long_content_is_moderated_in_full_windows(gen_dir: Path) -> None:
    guard = GenGuard.from_pretrained(str(gen_dir), max_input_tokens=600, window_overlap_tokens=32)
    long_text = " ".join(f"Sentence number {i} about gardening and tomatoes." for i in range(300))
    plan = plan_windows(normalize_messages([{"role": "user", "content": long_text}]), guard.tokens, guard.max_input_tokens, 32)
    assert len(plan) > 3
    covered = "".join(w[-1].content for w in plan)
    assert all(s in covered for s in ("Sentence number 0 ", "Sentence number 299 about gardening and tomatoes."))
    assert all(len(guard.tokens.encode_pieces(render_pieces(w))) <= guard.max_input_tokens for w in plan)
    for a, b in zip(plan, plan[1:]):
        assert a[-1].content[-20:] in b[-1].content, "consecutive windows overlap"
    verdict = guard.moderate([{"role": "user", "content": long_text}])
    per_window = guard.moderate_batch([[m.as_dict() for m in w] for w in plan])
    worst = max(per_window, key=lambda v: (v.error is not None, v.risk.severity))
    categories = tuple(dict.fromkeys(c for v in per_window if v.risk is worst.risk for c in v.categories))
    assert (verdict.risk, verdict.error, verdict.categories) == (worst.risk, worst.error, categories)


def test_long_response_keeps_the_recent_prompt_as_context(gen_dir: Path) -> None:
    guard = GenGuard.from_pretrained(str(gen_dir), max_input_tokens=700)
    answer = "Step. " * 2000
    plan = plan_windows(normalize_messages([{"role": "user", "content": UNSAFE_PROMPT}, {"role": "assistant", "content": answer}]),
                        guard.tokens, guard.max_input_tokens, 64)
    assert len(plan) > 2 and all(w[0].content == UNSAFE_PROMPT and w[-1].role == "assistant" for w in plan)
    assert guard.moderate([{"role": "user", "content": UNSAFE_PROMPT}, {"role": "assistant", "content": answer}]).role == "response"


def test_a_conversation_of_thousands_of_short_turns_is_windowed_not_refused(gen_guard: GenGuard) -> None:
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(4000)]
    turns.append({"role": "user", "content": UNSAFE_PROMPT})
    plan = plan_windows(normalize_messages(turns), gen_guard.tokens, gen_guard.max_input_tokens, 64)
    assert len(plan) == 1 and plan[0][-1].content == UNSAFE_PROMPT
    assert 1 < len(plan[0]) < len(turns) and plan[0][-2].content == "turn 3999"  # the most recent turns are kept
    assert len(gen_guard.tokens.encode_pieces(render_pieces(plan[0]))) <= gen_guard.max_input_tokens
    assert gen_guard.moderate(turns).role == "prompt"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "empty"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], "only the first message"),
        ([{"role": "system", "content": "x"}], "last message must be"),
        ([{"role": "user", "content": "   "}], "is empty"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], "only text parts"),
        ([{"role": "user", "content": b"\x00\x01binary"}], "bytes"),
        ([{"role": "user", "content": "a\x00b"}], "NUL"),
        ([{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}], "limit"),
        ([{"role": "user"}], "missing"),
        ("How can I make a bomb?", "list of"),
        ([["user", "hi"]], "expected a dict"),
        ({"role": "user", "content": "How can I make a bomb?"}, "list of"),
        (None, "list of"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "no string 'text'"),
    ],
)
def test_bad_input_raises_value_error_with_the_reason(gen_guard: GenGuard, messages: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        gen_guard.moderate(messages)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=reason):
        asyncio.run(gen_guard.amoderate(messages))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"conversation 1: .*{reason}"):
        gen_guard.moderate_batch([[{"role": "user", "content": "hi"}], messages])  # type: ignore[list-item]


@pytest.mark.parametrize("conversations", [None, "How can I make a bomb?", {"role": "user", "content": "hi"}, 42])
def test_a_batch_that_is_not_a_list_of_conversations_is_refused(gen_guard: GenGuard, conversations: object) -> None:
    with pytest.raises(ValueError, match="conversations must be a list of conversations"):
        gen_guard.moderate_batch(conversations)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="conversations must be a list of conversations"):
        asyncio.run(gen_guard.amoderate_batch(conversations))  # type: ignore[arg-type]


def test_unreachable_hub_gives_one_actionable_error() -> None:
    with pytest.raises(GuardUnavailableError) as info:
        GenGuard.from_pretrained("Qwen/Qwen3Guard-Gen-Nonexistent")
    message = str(info.value)
    assert "Qwen/Qwen3Guard-Gen-Nonexistent" in message and "--local-dir" in message
    assert info.value.__cause__ is None


def test_missing_local_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(GuardUnavailableError, match="does not exist"):
        GenGuard.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps({}))
    with pytest.raises(GuardUnavailableError, match="tokenizer.json"):
        GenGuard.from_pretrained(str(tmp_path / "half"))


@pytest.mark.parametrize(("options", "reason"), [
    ({"batch_size": "4"}, "batch_size must be an int >= 1, got '4'"),
    ({"window_overlap_tokens": "x"}, "window_overlap_tokens must be an int >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
    ({"max_input_tokens": 10}, "max_input_tokens must be an int >= 65"),
])
def test_sizes_are_checked_when_the_guard_is_built(gen_dir, options, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        GenGuard.from_pretrained(str(gen_dir), **options)
