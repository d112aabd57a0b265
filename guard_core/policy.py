"""Turning a model verdict into a decision.

Qwen3Guard's ``Controversial`` level is meant to be re-classified per application (the report's
strict and loose modes), and deployments differ on categories (a news site allows political
topics, a children's app does not). All of that lives here, once, so every adapter decides alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Mapping, TypeVar

from .types import Category, RiskLevel, Verdict


_E = TypeVar("_E", bound=Enum)


def _member(enum: type[_E], value: object, what: str) -> _E:
    """``enum(value)``, or a ValueError naming the field and the accepted values."""
    try:
        return enum(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum)  # type: ignore[attr-defined]
        raise ValueError(f"{what} {value!r} is not one of {accepted}") from None


class Mode(str, Enum):
    """How ``Controversial`` is treated: ``strict`` counts it as Unsafe, ``loose`` as Safe."""

    STRICT = "strict"
    LOOSE = "loose"


class Action(str, Enum):
    """What an adapter does with content.

    ``ALLOW`` lets it through; ``FLAG`` lets it through with the verdict attached; ``REVIEW``
    lets it through and records an item for a human to look at (the report's "permitted with
    human review" deployment of the Controversial tier, see ``guard_core.review``); ``BLOCK``
    stops it.
    """

    ALLOW = "allow"
    FLAG = "flag"
    REVIEW = "review"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        """Strictness (allow < flag < review < block): the strictest of several actions wins."""
        return _ACTION_ORDER[self]


def _default_actions(mode: Mode) -> dict[RiskLevel, Action]:
    controversial = Action.BLOCK if mode is Mode.STRICT else Action.ALLOW
    return {RiskLevel.SAFE: Action.ALLOW, RiskLevel.CONTROVERSIAL: controversial, RiskLevel.UNSAFE: Action.BLOCK}


@dataclass(frozen=True)
class Policy:
    """Rules that map a ``Verdict`` to an ``Action``.

    - ``mode``: strict (default) folds Controversial into Unsafe, loose into Safe.
    - ``unsafe_threshold``: when set and probabilities are known, content is Unsafe iff
      P(Unsafe) >= threshold (otherwise the likelier of Safe / Controversial), so operators can
      trade recall for precision without retraining.
    - ``category_actions``: per-category overrides applied to non-safe verdicts (e.g. allow
      ``Politically Sensitive Topics``, always block ``Jailbreak``). A category without an
      override gets its level's action, and the strictest action of all the verdict's categories
      wins, so allowing one category never lets another one through.
    - ``actions``: the action for each level; unspecified levels follow ``mode`` (Safe allows,
      Unsafe blocks, Controversial blocks in strict mode and is allowed in loose mode). Set
      ``{RiskLevel.CONTROVERSIAL: Action.FLAG}`` to let it through with the verdict attached, or
      ``Action.REVIEW`` to let it through and queue it for human review.
    - ``on_error``: the level assumed when the guard was unavailable (an unreachable, overloaded
      or failing server); Unsafe by default, i.e. fail closed. Input the guard rejected (e.g.
      longer than the server's context) and answers that could not be parsed are Unsafe whatever
      ``on_error`` says: fail-open covers outages, never content the guard refused. A model that
      cannot be loaded is a configuration error, raised (``GuardUnavailableError``) whatever
      ``on_error`` says: a mistyped path must not turn moderation off.
    """

    mode: Mode = Mode.STRICT
    unsafe_threshold: float | None = None
    category_actions: Mapping[Category, Action] = field(default_factory=dict)
    actions: Mapping[RiskLevel, Action] = field(default_factory=dict)
    on_error: RiskLevel = RiskLevel.UNSAFE

    def __post_init__(self) -> None:
        threshold = self.unsafe_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise TypeError(f"unsafe_threshold must be a number in (0, 1] or None, got {type(threshold).__name__} {threshold!r}")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"unsafe_threshold must be in (0, 1], got {threshold!r}")
        for name in ("actions", "category_actions"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        object.__setattr__(self, "mode", _member(Mode, self.mode, "mode"))
        object.__setattr__(self, "on_error", _member(RiskLevel, self.on_error, "on_error"))
        given = {_member(RiskLevel, k, "actions key"): _member(Action, v, "action") for k, v in self.actions.items()}
        object.__setattr__(self, "actions", {**_default_actions(self.mode), **given})
        object.__setattr__(self, "category_actions", {_member(Category, k, "category_actions key"): _member(Action, v, "action")
                                                      for k, v in self.category_actions.items()})

    @classmethod
    def strict(cls) -> Policy:
        """Block Unsafe and Controversial (the report's strict mode)."""
        return cls(mode=Mode.STRICT)

    @classmethod
    def loose(cls) -> Policy:
        """Block only Unsafe (the report's loose mode)."""
        return cls(mode=Mode.LOOSE)

    def with_overrides(self, **changes: object) -> Policy:
        """A copy with some fields changed (policies are immutable and shared across threads)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def model_level(self, verdict: Verdict) -> RiskLevel:
        """The level after the probability threshold, before strict/loose folding."""
        if not isinstance(verdict, Verdict):
            raise TypeError(f"a Policy decides on a guard_core.Verdict, got {type(verdict).__name__}")
        if verdict.error is not None:
            return self.on_error if verdict.error_kind == "unavailable" else RiskLevel.UNSAFE
        probs = verdict.probabilities
        if self.unsafe_threshold is None or not probs:
            return verdict.risk
        if probs.get(RiskLevel.UNSAFE, 0.0) >= self.unsafe_threshold:
            return RiskLevel.UNSAFE
        safe, controversial = probs.get(RiskLevel.SAFE, 0.0), probs.get(RiskLevel.CONTROVERSIAL, 0.0)
        return RiskLevel.CONTROVERSIAL if controversial > safe else RiskLevel.SAFE

    def effective_level(self, verdict: Verdict) -> RiskLevel:
        """Safe or Unsafe after strict/loose folding; Controversial never survives this."""
        level = self.model_level(verdict)
        if level is RiskLevel.CONTROVERSIAL:
            return RiskLevel.UNSAFE if self.mode is Mode.STRICT else RiskLevel.SAFE
        return level

    def action_for(self, verdict: Verdict) -> Action:
        """The action an adapter must take for this verdict."""
        level = self.model_level(verdict)
        if level is RiskLevel.SAFE:
            return self.actions[RiskLevel.SAFE]
        # Each category gets its override or, without one, the level's action: an override on one
        # category (allow political topics) must not whitelist another one in the same verdict.
        level_action = self.actions[level]
        actions = [self.category_actions.get(c, level_action) for c in verdict.categories] or [level_action]
        return max(actions, key=lambda action: action.rank)

    def blocks(self, verdict: Verdict) -> bool:
        """True when the verdict must stop the content."""
        return self.action_for(verdict) is Action.BLOCK

    @property
    def reviews(self) -> bool:
        """True when some verdict can lead to ``Action.REVIEW`` (a review queue is then needed)."""
        return Action.REVIEW in (*self.actions.values(), *self.category_actions.values())


_ACTION_ORDER = {Action.ALLOW: 0, Action.FLAG: 1, Action.REVIEW: 2, Action.BLOCK: 3}
