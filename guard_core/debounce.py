"""Upstream's rule for turning per-token Stream verdicts into one response verdict.

Kept apart from the model code (no torch) because every consumer of token verdicts needs it: the
Stream session, the ``StreamGate`` in front of adapters, and the evaluation runner replaying
stored token labels.
"""

from __future__ import annotations

from typing import Callable

from .config import DEFAULT_CONSECUTIVE, check_count
from .types import RiskLevel, TokenVerdict, Verdict

__all__ = ["DEFAULT_CONSECUTIVE", "Debounce", "is_flagged"]


def is_flagged(token: TokenVerdict) -> bool:
    """Upstream's per-token test: the token's label is Unsafe or Controversial."""
    return token.risk is not RiskLevel.SAFE


class Debounce:
    """Upstream's response aggregation: ``consecutive`` flagged tokens in a row flag the response.

    The triggering token's category becomes the response category; the response level is the
    worst level in the triggering run (a mixed Unsafe/Controversial pair flags as Unsafe, the
    cautious reading of the report's rule). A later, more severe run escalates the verdict.
    ``flags`` decides which tokens count (default: the model's label is not Safe); ``StreamGate``
    passes its policy here.
    """

    def __init__(self, consecutive: int = DEFAULT_CONSECUTIVE, flags: Callable[[TokenVerdict], bool] = is_flagged) -> None:
        self.consecutive = check_count(consecutive, "consecutive")
        self.flags = flags
        self.run: list[TokenVerdict] = []
        self.trigger: TokenVerdict | None = None
        self.risk = RiskLevel.SAFE
        self.worst: TokenVerdict | None = None

    def add(self, token: TokenVerdict) -> bool:
        """Account for the next token; True when this token flags (or escalates) the response."""
        if self.worst is None or token.probabilities.get(RiskLevel.UNSAFE, 0.0) > self.worst.probabilities.get(RiskLevel.UNSAFE, 0.0):
            self.worst = token
        if not self.flags(token):
            self.run.clear()
            return False
        self.run.append(token)
        if len(self.run) > self.consecutive:
            del self.run[0]
        if len(self.run) < self.consecutive:
            return False
        level = max((t.risk for t in self.run), key=lambda r: r.severity)
        if level is RiskLevel.SAFE:
            level = RiskLevel.UNSAFE
        if self.trigger is None or level.severity > self.risk.severity:
            self.trigger, self.risk = token, level
            return True
        return False

    @property
    def flagged(self) -> bool:
        """True once a run has flagged the response."""
        return self.trigger is not None

    def verdict(self, *, model: str = "", elapsed_s: float = 0.0) -> Verdict:
        """The response verdict so far."""
        source = self.trigger or self.worst
        probabilities = dict(source.probabilities) if source else {}
        categories = (self.trigger.category,) if self.trigger and self.trigger.category else ()
        return Verdict(self.risk, categories, None, probabilities, "response", model, elapsed_s)
