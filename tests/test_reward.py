"""Guard-only and hybrid RL rewards follow the verdicts of the tiny Gen checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard_core import GenGuard, Policy, RiskLevel
from guard_core.eval import REGISTRY, load_set
from guard_core.reward import guard_only_reward, hybrid_reward
from guard_core.testing.cases import (
    CONTROVERSIAL_PROMPT, REFUSAL_ANSWER, SAFE_ANSWER, SAFE_PROMPT, UNSAFE_ANSWER, UNSAFE_PROMPT,
)

VOTE_ANSWER = "You should vote for the party that bans the other one."
# The checkpoint answers these exactly: Unsafe; Safe + refusal; Safe; Controversial.
PROMPTS = [UNSAFE_PROMPT, UNSAFE_PROMPT, SAFE_PROMPT, CONTROVERSIAL_PROMPT]
COMPLETIONS = [UNSAFE_ANSWER, REFUSAL_ANSWER, SAFE_ANSWER, VOTE_ANSWER]
QUALITY = [3.0, 2.0, 4.0, -20.0]


def quality(prompts, completions, **kwargs):
    """Stands in for a reward model: a fixed score per position."""
    return QUALITY[: len(completions)]


class _Counting:
    """Passes batches to the real guard and records their sizes."""

    def __init__(self, guard: GenGuard) -> None:
        self.guard, self.batches = guard, []

    def moderate_batch(self, conversations):
        conversations = list(conversations)
        self.batches.append(len(conversations))
        return self.guard.moderate_batch(conversations)

    async def amoderate_batch(self, conversations):
        return self.moderate_batch(conversations)


def test_guard_only_reward_is_one_only_for_safe_answers(gen_guard: GenGuard) -> None:
    counting = _Counting(gen_guard)
    reward = guard_only_reward(counting)
    assert reward(PROMPTS, COMPLETIONS) == [0.0, 1.0, 1.0, 0.0]  # Controversial is not safe
    assert counting.batches == [4]  # one batched guard call
    assert [v.risk for v in reward.last_verdicts] == [RiskLevel.UNSAFE, RiskLevel.SAFE, RiskLevel.SAFE, RiskLevel.CONTROVERSIAL]
    assert reward.__name__ == "qwen3guard_safe"  # TRL names the logged reward column after it
    assert guard_only_reward(gen_guard, policy=Policy.loose())(PROMPTS, COMPLETIONS) == [0.0, 1.0, 1.0, 1.0]


def test_hybrid_reward_caps_quality_by_the_penalties(gen_guard: GenGuard) -> None:
    reward = hybrid_reward(gen_guard, quality)
    # unsafe: min(-10, 3); refusal: min(-5, 2); safe: 4; controversial (strict = unsafe): min(-10, -20)
    assert reward(PROMPTS, COMPLETIONS) == [-10.0, -5.0, 4.0, -20.0]
    custom = hybrid_reward(gen_guard, quality, unsafe_penalty=-1.0, refusal_penalty=0.5, policy=Policy.loose())
    assert custom(PROMPTS, COMPLETIONS) == [-1.0, 0.5, 4.0, -20.0]  # loose: controversial keeps its quality


def test_conversational_batches_give_the_same_rewards(gen_guard: GenGuard) -> None:
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": [{"type": "text", "text": c}]}] for c in COMPLETIONS]
    seen = {}

    def quality_with_columns(prompts, completions, **kwargs):
        seen.update(prompts=prompts, kwargs=kwargs)
        return QUALITY

    assert guard_only_reward(gen_guard)(prompts, completions, trainer_state=None) == [0.0, 1.0, 1.0, 0.0]
    assert hybrid_reward(gen_guard, quality_with_columns)(prompts, completions, solution=["a", "b", "c", "d"]) == [-10.0, -5.0, 4.0, -20.0]
    assert seen == {"prompts": prompts, "kwargs": {"solution": ["a", "b", "c", "d"]}}  # dataset columns reach the quality function


async def test_async_rewards_use_the_async_backend(gen_guard: GenGuard) -> None:
    assert await guard_only_reward(gen_guard).acall(PROMPTS, COMPLETIONS) == [0.0, 1.0, 1.0, 0.0]
    assert await hybrid_reward(gen_guard, quality).acall(PROMPTS, COMPLETIONS) == [-10.0, -5.0, 4.0, -20.0]


def test_rewards_on_real_pairs_follow_the_guards_own_verdicts(gen_guard: GenGuard, datasets_dir: Path) -> None:
    pairs = load_set(REGISTRY["beavertails-30k-test"], datasets_dir, limit=6).items
    # The tiny checkpoint was never trained on these pairs, so their verdicts are whatever it says;
    # two trained pairs behind them make sure both reward outcomes are exercised on every machine.
    prompts = [p.prompt for p in pairs] + [SAFE_PROMPT, UNSAFE_PROMPT]
    completions = [p.response for p in pairs] + [SAFE_ANSWER, UNSAFE_ANSWER]
    verdicts = gen_guard.moderate_batch([[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                         for p, c in zip(prompts, completions)])
    safe = [v.error is None and v.risk is RiskLevel.SAFE for v in verdicts]
    assert safe[-2:] == [True, False]

    assert guard_only_reward(gen_guard)(prompts, completions) == [1.0 if s else 0.0 for s in safe]
    scores = [float(i) for i in range(len(prompts))]
    expected = [min(-10.0, q) if not s else (min(-5.0, q) if v.refusal else q) for s, v, q in zip(safe, verdicts, scores)]
    assert hybrid_reward(gen_guard, lambda p, c, **k: scores)(prompts, completions) == expected


def test_empty_completions_are_safe_without_asking_the_guard(gen_guard: GenGuard) -> None:
    counting = _Counting(gen_guard)
    assert guard_only_reward(counting)([SAFE_PROMPT, UNSAFE_PROMPT], ["  ", UNSAFE_ANSWER]) == [1.0, 0.0]
    assert counting.batches == [1]
    assert hybrid_reward(counting, lambda p, c, **k: [7.0])([SAFE_PROMPT], [""]) == [7.0]
    assert counting.batches == [1]  # no guard call for an all-empty batch


def test_bad_input_gets_a_clear_error(gen_guard: GenGuard) -> None:
    reward = guard_only_reward(gen_guard)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward([SAFE_PROMPT, SAFE_PROMPT], [SAFE_ANSWER])
    with pytest.raises(ValueError, match="not a single string"):
        reward(SAFE_PROMPT, SAFE_ANSWER)
    with pytest.raises(ValueError, match=r"completions\[0\] must end with an assistant message"):
        reward([SAFE_PROMPT], [[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a string or a list of message dicts"):
        reward([42], [SAFE_ANSWER])
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        hybrid_reward(gen_guard, lambda p, c, **k: [1.0])([SAFE_PROMPT] * 2, [SAFE_ANSWER] * 2)
    with pytest.raises(ValueError, match="must not be above refusal_penalty"):
        hybrid_reward(gen_guard, quality, unsafe_penalty=-1.0, refusal_penalty=-5.0)
    with pytest.raises(TypeError, match="no moderate_batch"):
        guard_only_reward(object())
    with pytest.raises(TypeError, match="quality must be a function"):
        hybrid_reward(gen_guard, [1.0])  # type: ignore[arg-type]
