"""The Gen prefix cache: exact against the uncached path, used where it can be, refused where it cannot."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

import guard_core.gen as gen_module
from guard_core import GenGuard, Verdict
from guard_core.gen_template import (
    SAFE_RESPONSE_ANSWER,
    instruction_pieces,
    render_pieces,
)
from guard_core.messages import normalize_messages
from guard_core.testing import GEN_CASES, UNPARSEABLE_CASE
from guard_core.testing.cases import (
    CONTROVERSIAL_PROMPT,
    REFUSAL_ANSWER,
    SAFE_ANSWER,
    SAFE_PROMPT,
    UNSAFE_PROMPT,
)
from guard_core.tokenization import Piece
from guard_core.windows import plan_windows

CONVERSATIONS: list[list[dict[str, str]]] = [
    *(case.as_messages for case in GEN_CASES),
    UNPARSEABLE_CASE.as_messages,
    [{"role": "user", "content": SAFE_PROMPT}, {"role": "assistant", "content": SAFE_ANSWER},
     {"role": "user", "content": UNSAFE_PROMPT}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": UNSAFE_PROMPT}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": UNSAFE_PROMPT},
     {"role": "assistant", "content": REFUSAL_ANSWER}],
    [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": CONTROVERSIAL_PROMPT}],
]
SAFE = [{"role": "user", "content": SAFE_PROMPT}]
LONG_PROMPT = [{"role": "user", "content": " ".join(f"Sentence number {i} about gardening and tomatoes." for i in range(120))}]
LONG_RESPONSE = [{"role": "user", "content": UNSAFE_PROMPT}, {"role": "assistant", "content": "Step. " * 700}]


@pytest.fixture(scope="module")
def uncached(gen_dir: Path) -> GenGuard:
    """The same checkpoint with the prefix cache off: the reference every cached result must equal."""
    return GenGuard.from_pretrained(str(gen_dir), prefix_cache=False)


def assert_same_verdict(got: Verdict, want: Verdict) -> None:
    assert (got.risk, got.categories, got.refusal, got.role, got.raw_output, got.error_kind) == (
        want.risk, want.categories, want.refusal, want.role, want.raw_output, want.error_kind)
    assert got.probabilities.keys() == want.probabilities.keys()
    for level, p in want.probabilities.items():
        assert got.probabilities[level] == pytest.approx(p, abs=1e-4)


class ForwardLog:
    """Records the ``input_ids`` shape of every forward through the model's backbone."""

    def __init__(self, guard: GenGuard) -> None:
        self.shapes: list[tuple[int, int]] = []
        self._handle = guard.model.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def take(self) -> list[tuple[int, int]]:
        shapes, self.shapes = self.shapes, []
        return shapes

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def forward_log() -> Iterator[list[ForwardLog]]:
    logs: list[ForwardLog] = []
    yield logs
    for log in logs:
        log.close()


def _ids(guard: GenGuard, messages: list[dict[str, str]]) -> list[int]:
    return guard.tokens.encode_pieces(render_pieces(normalize_messages(messages)))


def _answer_len(guard: GenGuard) -> int:
    return len(guard.tokens.encode_text("Safety:"))


def _draft_len(guard: GenGuard) -> int:
    """Tokens of the safe response answer that response mode checks after the forced ``Safety:``."""
    return len(guard.tokens.encode_text(SAFE_RESPONSE_ANSWER)) - _answer_len(guard)


def _plain_greedy(guard: GenGuard, messages: list[dict[str, str]]) -> str:
    """Upstream's loop: greedy ``generate()`` over the whole prompt, every token decoded."""
    ids = torch.tensor([_ids(guard, messages)])
    stops = guard.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    with torch.inference_mode():
        out = guard.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                   eos_token_id=stops, pad_token_id=stops[1])
    return guard.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_cached_verdicts_equal_uncached_on_every_test_conversation(gen_guard: GenGuard, uncached: GenGuard) -> None:
    cached_batch = gen_guard.moderate_batch(CONVERSATIONS)
    reference = uncached.moderate_batch(CONVERSATIONS)
    for messages, got, want in zip(CONVERSATIONS, cached_batch, reference):
        assert_same_verdict(got, want)
        assert_same_verdict(gen_guard.moderate(messages), want)
        assert_same_verdict(uncached.moderate(messages), want)


def test_cached_trained_cases_keep_their_exact_verdicts(gen_guard: GenGuard) -> None:
    for case, verdict in zip(GEN_CASES, gen_guard.moderate_batch([c.as_messages for c in GEN_CASES])):
        assert (verdict.risk, verdict.categories) == (case.risk, case.categories)
        assert max(verdict.probabilities, key=verdict.probabilities.__getitem__) is case.risk


@pytest.mark.parametrize("messages", [LONG_PROMPT, LONG_RESPONSE], ids=["long-prompt", "long-response"])
def test_long_input_windows_are_exact_with_the_cache(gen_dir: Path, messages: list[dict[str, str]]) -> None:
    cached = GenGuard.from_pretrained(str(gen_dir), max_input_tokens=600, window_overlap_tokens=32)
    full = GenGuard.from_pretrained(str(gen_dir), max_input_tokens=600, window_overlap_tokens=32, prefix_cache=False)
    assert len(plan_windows(normalize_messages(messages), cached.tokens, cached.max_input_tokens, 32)) > 1
    assert_same_verdict(cached.moderate(messages), full.moderate(messages))
    batch = cached.moderate_batch([messages, SAFE, messages])
    assert_same_verdict(batch[0], full.moderate(messages))
    assert_same_verdict(batch[1], full.moderate(SAFE))
    assert_same_verdict(batch[2], batch[0])


def test_prefix_is_computed_once_per_mode_and_only_the_rest_per_verdict(gen_dir: Path, forward_log: list[ForwardLog]) -> None:
    guard = GenGuard.from_pretrained(str(gen_dir))
    log = ForwardLog(guard)
    forward_log.append(log)
    prefix = len(guard.tokens.encode_pieces(instruction_pieces(False)))
    rest = len(_ids(guard, SAFE)) - prefix + _answer_len(guard)

    guard.moderate(SAFE)
    assert log.take() == [(1, prefix), (1, rest)], "first call: the prefix once, then only the rest"
    guard.moderate(SAFE)
    assert log.take() == [(1, rest)]

    others = [[{"role": "user", "content": p}] for p in ("What is the capital of France?", UNSAFE_PROMPT)]
    guard.moderate_batch([SAFE, *others])
    width = max(len(_ids(guard, m)) for m in [SAFE, *others]) - prefix + _answer_len(guard)
    assert log.take()[0] == (3, width), "a batch shares the cached prefix: one forward over the rests only"


def test_uncached_guard_computes_the_whole_prompt(uncached: GenGuard, forward_log: list[ForwardLog]) -> None:
    log = ForwardLog(uncached)
    forward_log.append(log)
    uncached.moderate(SAFE)
    assert log.take() == [(1, len(_ids(uncached, SAFE)) + _answer_len(uncached))]


def test_repeated_calls_are_identical_after_batches_of_every_shape(gen_guard: GenGuard) -> None:
    first = [gen_guard.moderate(c.as_messages) for c in (GEN_CASES[0], GEN_CASES[6])]
    gen_guard.moderate_batch(CONVERSATIONS)
    gen_guard.moderate_batch(CONVERSATIONS[:3])
    gen_guard.moderate_batch([CONVERSATIONS[7]] * 5)
    again = [gen_guard.moderate(c.as_messages) for c in (GEN_CASES[0], GEN_CASES[6])]
    assert [(v.raw_output, dict(v.probabilities)) for v in again] == [(v.raw_output, dict(v.probabilities)) for v in first], (
        "no call may change the shared prefix")


def test_threads_sharing_a_fresh_guard_get_exact_verdicts(gen_dir: Path, uncached: GenGuard) -> None:
    guard = GenGuard.from_pretrained(str(gen_dir))
    reference = uncached.moderate_batch(CONVERSATIONS)
    results: dict[int, Verdict] = {}
    start = threading.Barrier(len(CONVERSATIONS))

    def work(i: int) -> None:
        start.wait()
        results[i] = guard.moderate(CONVERSATIONS[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(CONVERSATIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(reference):
        assert_same_verdict(results[i], want)


def _cut_prompt_prefix_mid_word(response: bool) -> list[Piece]:
    """Prompt mode's instructions ending in ``<BEGIN CONVERSATI``: tokens at the cut differ from the whole prompt's."""
    pieces = instruction_pieces(response)
    return pieces if response else [*pieces[:-1], Piece(pieces[-1].text.removesuffix("ON>\n\n"))]


def test_a_prefix_whose_seam_differs_is_refused_with_one_log_line(
    gen_dir: Path, uncached: GenGuard, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    forward_log: list[ForwardLog],
) -> None:
    monkeypatch.setattr(gen_module, "instruction_pieces", _cut_prompt_prefix_mid_word)
    cut = uncached.tokens.encode_pieces(_cut_prompt_prefix_mid_word(False))
    assert _ids(uncached, SAFE)[: len(cut)] != cut, "precondition: the cut is not a token boundary"

    with caplog.at_level(logging.WARNING, logger="guard_core.gen"):
        guard = GenGuard.from_pretrained(str(gen_dir))
    refusals = [r.getMessage() for r in caplog.records if "prefix cache off" in r.getMessage()]
    assert len(refusals) == 1 and "prompt mode" in refusals[0]

    for got, want in zip(guard.moderate_batch(CONVERSATIONS), uncached.moderate_batch(CONVERSATIONS)):
        assert_same_verdict(got, want)
    log = ForwardLog(guard)
    forward_log.append(log)
    guard.moderate(SAFE)
    assert log.take() == [(1, len(_ids(guard, SAFE)) + _answer_len(guard))], "prompt mode computes the whole prompt"
    response = [{"role": "user", "content": SAFE_PROMPT}, {"role": "assistant", "content": SAFE_ANSWER}]
    guard.moderate(response)
    response_prefix = len(guard.tokens.encode_pieces(instruction_pieces(True)))
    rest = len(_ids(guard, response)) - response_prefix + _answer_len(guard) + _draft_len(guard)
    assert log.take()[0] == (1, rest), "response mode stays cached"


def test_a_conversation_that_changes_the_seam_turns_the_cache_off_for_its_mode(
    gen_dir: Path, uncached: GenGuard, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A seam that depends on the conversation (here: a prefix reaching into ``USER:``, which an
    assistant-first conversation does not start with) is caught per conversation even when the
    probes at load time pass."""
    monkeypatch.setattr(gen_module, "instruction_pieces",
                        lambda response: [*instruction_pieces(response)[:-1], Piece(instruction_pieces(response)[-1].text + "USER:")])
    monkeypatch.setattr(gen_module, "_SEAM_PROBES", tuple(p for p in gen_module._SEAM_PROBES if p[0]["role"] != "assistant"))
    guard = GenGuard.from_pretrained(str(gen_dir))
    assistant_first = CONVERSATIONS[-1]
    with caplog.at_level(logging.WARNING, logger="guard_core.gen"):
        verdicts = guard.moderate_batch([SAFE, assistant_first, SAFE])
    refusals = [r.getMessage() for r in caplog.records if "prefix cache off" in r.getMessage()]
    assert len(refusals) == 1 and "prompt mode" in refusals[0] and "a conversation changed" in refusals[0]
    for got, want in zip(verdicts, uncached.moderate_batch([SAFE, assistant_first, SAFE])):
        assert_same_verdict(got, want)


def test_answers_read_from_the_response_draft_equal_plain_greedy_generation(gen_guard: GenGuard, uncached: GenGuard) -> None:
    """Every answer, drafted or decoded, is the start of what upstream's greedy loop writes, up to its last needed line."""
    for messages, cached, full in zip(CONVERSATIONS, gen_guard.moderate_batch(CONVERSATIONS), uncached.moderate_batch(CONVERSATIONS)):
        plain = _plain_greedy(uncached, messages)
        assert plain.startswith(cached.raw_output) and plain.startswith(full.raw_output), (messages, plain)
    for case in (c for c in GEN_CASES if len(c.messages) == 2):
        assert gen_guard.moderate(case.as_messages).raw_output == case.output


@pytest.mark.parametrize("case", [c for c in GEN_CASES if len(c.messages) == 2 and c.risk.value == "Safe"],
                         ids=lambda c: c.output.rsplit(" ", 1)[-1])
def test_a_safe_response_refusal_or_not_is_judged_in_one_forward(gen_dir: Path, forward_log: list[ForwardLog], case) -> None:
    guard = GenGuard.from_pretrained(str(gen_dir))
    guard.moderate(case.as_messages)
    log = ForwardLog(guard)
    forward_log.append(log)
    verdict = guard.moderate(case.as_messages)
    assert verdict.raw_output == case.output
    prefix = len(guard.tokens.encode_pieces(instruction_pieces(True)))
    rest = len(_ids(guard, case.as_messages)) - prefix + _answer_len(guard) + _draft_len(guard)
    assert log.take() == [(1, rest)], "the verdict, categories and refusal line all come from the scoring pass"


def test_a_response_that_leaves_the_draft_is_decoded_on_from_its_label(gen_guard: GenGuard, forward_log: list[ForwardLog]) -> None:
    case = next(c for c in GEN_CASES if len(c.messages) == 2 and c.risk.value == "Unsafe")
    log = ForwardLog(gen_guard)
    forward_log.append(log)
    assert gen_guard.moderate(case.as_messages).raw_output == case.output
    shapes = log.take()
    assert len(shapes) > 2 and all(shape == (1, 1) for shape in shapes[2:]), "decoding goes on one token per step"
    assert shapes[1] == (1, 1), "after the draft is cropped, decoding starts at the label token"


def test_max_new_tokens_bounds_an_answer_read_from_the_draft_as_it_bounds_decoding(gen_dir: Path) -> None:
    case = next(c for c in GEN_CASES if c.output.endswith("Refusal: No") and c.risk.value == "Safe")
    guard = GenGuard.from_pretrained(str(gen_dir), max_new_tokens=3)
    ids = guard.tokens.encode_text(case.output)
    assert guard.moderate(case.as_messages).raw_output == guard.tokenizer.decode(ids[: _answer_len(guard) + 1 + 3])
