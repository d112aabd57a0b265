"""Qwen3Guard as a reward for RL fine-tuning (the technical report's Safety RL, section 3.10).

Two rewards, as in the report:

- ``guard_only_reward``: 1.0 for a safe response, 0.0 otherwise (Controversial is not safe).
  Drives the safety rate up but, as the report shows, teaches the model to refuse everything.
- ``hybrid_reward``: ``min(unsafe_penalty, q)`` for an unsafe response, ``min(refusal_penalty,
  q)`` for a refusal, else ``q``, where ``q`` is a quality score from a function you supply
  (the report used the WorldPM-HelpSteer2 reward model; penalties -10 and -5). This keeps
  safety up without rewarding refusals of harmless requests.

Both are callables with the signature TRL's ``GRPOTrainer`` / ``RLOOTrainer`` expect,
``reward(prompts, completions, **kwargs) -> list[float]``, accepting plain strings or
conversational lists of message dicts; each call moderates the whole batch in one
``moderate_batch`` on any Gen backend (local ``GenGuard`` or a remote client).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from .eval.runner import GenBackend
from .messages import content_to_text
from .policy import Policy
from .types import RiskLevel, Verdict

#: A quality score with the same signature as a TRL reward function (so one can be reused).
QualityFn = Callable[..., Sequence[float]]


def _conversation(prompt: Any, completion: Any, position: int) -> list[dict[str, Any]]:
    """The conversation to moderate: the prompt turn(s) followed by the completion turn(s)."""
    if isinstance(prompt, str):
        turns: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        turns = [dict(m) for m in prompt]
    else:
        raise ValueError(f"prompts[{position}] must be a string or a list of message dicts, got {type(prompt).__name__}")
    if isinstance(completion, str):
        turns.append({"role": "assistant", "content": completion})
    elif isinstance(completion, Sequence) and completion and all(isinstance(m, Mapping) for m in completion):
        turns += [{"role": m.get("role", "assistant"), "content": m.get("content")} for m in completion]
    else:
        raise ValueError(f"completions[{position}] must be a string or a non-empty list of message dicts, "
                         f"got {type(completion).__name__}")
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"completions[{position}] must end with an assistant message, not {turns[-1]['role']!r}")
    return turns


class GuardReward:
    """Base of the guard rewards: turns a batch into conversations and verdicts.

    An empty completion is not sent to the guard (there is nothing to moderate, and the guard
    rejects empty turns); it counts as Safe and not a refusal, so the hybrid reward leaves its
    score to the quality function. ``last_verdicts`` keeps the latest batch's verdicts for
    logging. ``__name__`` is set because TRL names the reward's log column after it.
    """

    __name__: str

    def __init__(self, guard: GenBackend, *, policy: Policy | None = None, name: str) -> None:
        if not callable(getattr(guard, "moderate_batch", None)):
            raise TypeError(f"{type(guard).__name__} has no moderate_batch(); pass a GenGuard or a remote Gen client")
        self.guard = guard
        self.policy = policy or Policy.strict()
        self.__name__ = name
        self.last_verdicts: list[Verdict] = []

    def verdicts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[Verdict]:
        """Response verdicts for the batch, in order (one ``moderate_batch`` call)."""
        conversations, todo = self._plan(prompts, completions)
        judged = self.guard.moderate_batch([conversations[i] for i in todo]) if todo else []
        return self._merge(len(conversations), todo, judged)

    async def averdicts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[Verdict]:
        """``verdicts`` through the backend's ``amoderate_batch`` (for async training loops)."""
        conversations, todo = self._plan(prompts, completions)
        judged = await self.guard.amoderate_batch([conversations[i] for i in todo]) if todo else []
        return self._merge(len(conversations), todo, judged)

    @staticmethod
    def _plan(prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[list[dict[str, Any]]], list[int]]:
        """The batch's conversations and the positions of those with a non-empty completion."""
        if isinstance(prompts, str) or isinstance(completions, str):
            raise ValueError("prompts and completions must be lists (one entry per sample), not a single string")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        conversations = [_conversation(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions))]
        todo = [i for i, c in enumerate(conversations) if content_to_text(c[-1]["content"], where=f"completions[{i}]").strip()]
        return conversations, todo

    def _merge(self, size: int, todo: list[int], judged: Sequence[Verdict]) -> list[Verdict]:
        if len(judged) != len(todo):
            raise RuntimeError(f"the guard returned {len(judged)} verdicts for {len(todo)} conversations")
        verdicts = [Verdict(RiskLevel.SAFE, refusal=False, role="response") for _ in range(size)]
        for i, verdict in zip(todo, judged):
            verdicts[i] = verdict
        self.last_verdicts = verdicts
        return verdicts

    def is_unsafe(self, verdict: Verdict) -> bool:
        """Unsafe after the policy's folding (strict by default: Controversial is unsafe; errors fail closed)."""
        return self.policy.effective_level(verdict) is RiskLevel.UNSAFE


class GuardOnlyReward(GuardReward):
    """1.0 when the guard finds the response safe, else 0.0 (see ``guard_only_reward``)."""

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return self.scores(self.verdicts(prompts, completions))

    async def acall(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """Async twin of calling the reward."""
        return self.scores(await self.averdicts(prompts, completions))

    def scores(self, verdicts: Sequence[Verdict]) -> list[float]:
        """The rewards for already computed verdicts."""
        return [0.0 if self.is_unsafe(v) else 1.0 for v in verdicts]


class HybridReward(GuardReward):
    """Quality score, capped by a penalty for unsafe responses and a smaller one for refusals."""

    def __init__(
        self,
        guard: GenBackend,
        quality: QualityFn,
        *,
        unsafe_penalty: float = -10.0,
        refusal_penalty: float = -5.0,
        policy: Policy | None = None,
        name: str,
    ) -> None:
        super().__init__(guard, policy=policy, name=name)
        if not callable(quality):
            raise TypeError("quality must be a function (prompts, completions, **kwargs) -> list of floats")
        if unsafe_penalty > refusal_penalty:
            raise ValueError(f"unsafe_penalty ({unsafe_penalty}) must not be above refusal_penalty ({refusal_penalty}): "
                             "an unsafe answer must never earn more than a refusal")
        self.quality = quality
        self.unsafe_penalty = float(unsafe_penalty)
        self.refusal_penalty = float(refusal_penalty)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        verdicts = self.verdicts(prompts, completions)
        return self.scores(verdicts, self._quality(prompts, completions, kwargs))

    async def acall(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """Async twin of calling the reward (the quality function is still called synchronously)."""
        verdicts = await self.averdicts(prompts, completions)
        return self.scores(verdicts, self._quality(prompts, completions, kwargs))

    def _quality(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: dict[str, Any]) -> list[float]:
        values = list(self.quality(prompts, completions, **kwargs))
        if len(values) != len(completions):
            raise ValueError(f"the quality function returned {len(values)} scores for {len(completions)} completions")
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"the quality function must return numbers, got {values[:3]!r}...") from None

    def scores(self, verdicts: Sequence[Verdict], quality: Sequence[float]) -> list[float]:
        """The rewards for already computed verdicts and quality scores."""
        out = []
        for verdict, q in zip(verdicts, quality):
            if self.is_unsafe(verdict):
                out.append(min(self.unsafe_penalty, q))
            elif verdict.refusal:
                out.append(min(self.refusal_penalty, q))
            else:
                out.append(q)
        return out


def guard_only_reward(guard: GenBackend, *, policy: Policy | None = None, name: str = "qwen3guard_safe") -> GuardOnlyReward:
    """The report's guard-only reward: 1.0 if the response is safe, else 0.0.

    ``policy`` decides what "safe" means (default strict: Controversial and unparseable verdicts
    are not safe); pass ``Policy.loose()`` to reward Controversial answers too.
    """
    return GuardOnlyReward(guard, policy=policy, name=name)


def hybrid_reward(
    guard: GenBackend,
    quality: QualityFn,
    *,
    unsafe_penalty: float = -10.0,
    refusal_penalty: float = -5.0,
    policy: Policy | None = None,
    name: str = "qwen3guard_hybrid",
) -> HybridReward:
    """The report's hybrid reward: ``min(-10, q)`` if unsafe, ``min(-5, q)`` if a refusal, else ``q``.

    ``quality(prompts, completions, **kwargs)`` scores the whole batch (e.g. a reward model, or
    any other TRL reward function) and receives exactly what the trainer passed. Penalties are
    caps, not offsets, so a bad answer is never lifted above its quality score.
    """
    return HybridReward(guard, quality, unsafe_penalty=unsafe_penalty, refusal_penalty=refusal_penalty,
                        policy=policy, name=name)
