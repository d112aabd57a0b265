"""Where to set the bar: precision, recall, F1 and false-positive rate as ``unsafe_threshold`` moves.

The runner keeps every verdict with its probabilities, so the first question of every deployer
(strict or loose, and which ``Policy(unsafe_threshold=...)``) is answered from the user's own
data without running a model again. Each engine and labelled set gets three curves, one per
``Rule``:

- ``loose``: ``Policy(mode="loose", unsafe_threshold=t)``, unsafe iff P(Unsafe) >= t;
- ``strict``: ``Policy(unsafe_threshold=t)``, unsafe iff P(Unsafe) >= t or, below it,
  Controversial is likelier than Safe (``Policy.model_level``, then strict folding);
- ``strict-sum``: unsafe iff P(Unsafe) + P(Controversial) >= t. ``Policy`` has no such rule, so
  this curve is shown for comparison and never recommended.

Verdicts without probabilities (errors, a server without logprobs) keep the decision ``Policy``
gives them at every threshold. The recommended lines are scored by applying the very ``Policy``
they print to the verdicts, so the F1 reported is the F1 the user gets.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..policy import Mode, Policy
from ..types import RiskLevel, Verdict
from .metrics import Confusion, confusion, verdict_from_record
from .report import RESULTS_JSON
from .runner import PredictionStore

#: The thresholds ``thresholds.csv`` lists for every curve (0 flags every verdict with probabilities).
GRID: tuple[float, ...] = tuple(i / 100 for i in range(101))


@dataclass(frozen=True)
class Rule:
    """One way of turning a threshold into decisions: one curve of the sweep.

    ``summed`` thresholds P(Unsafe) + P(Controversial) instead of P(Unsafe); ``Policy`` cannot
    express that, so such a rule is never printed as a ``Policy(...)`` line.
    """

    name: str
    mode: Mode
    summed: bool
    description: str

    @property
    def expressible(self) -> bool:
        """Whether ``Policy(mode=..., unsafe_threshold=t)`` makes exactly this rule's decisions."""
        return not self.summed

    def policy(self, threshold: float | None) -> Policy:
        """The policy of this rule at ``threshold`` (None: the model's own label)."""
        if not self.expressible:
            raise ValueError(f"the {self.name} rule has no Policy equivalent")
        return Policy(mode=self.mode, unsafe_threshold=threshold)

    def inputs(self, verdict: Verdict) -> tuple[float | None, bool]:
        """``(score, always)``: the verdict counts as unsafe at ``t`` iff ``always`` or ``score >= t``."""
        probs = verdict.probabilities
        if verdict.error is not None or not probs:
            return None, Policy(mode=self.mode).effective_level(verdict) is RiskLevel.UNSAFE
        unsafe, controversial = probs.get(RiskLevel.UNSAFE, 0.0), probs.get(RiskLevel.CONTROVERSIAL, 0.0)
        if self.summed:
            return unsafe + controversial, False
        return unsafe, self.mode is Mode.STRICT and controversial > probs.get(RiskLevel.SAFE, 0.0)


#: The curves of every sweep, in the order they are drawn and written.
RULES: tuple[Rule, ...] = (
    Rule("loose", Mode.LOOSE, False, "P(Unsafe) >= t, loose"),
    Rule("strict", Mode.STRICT, False, "P(Unsafe) >= t, strict"),
    Rule("strict-sum", Mode.STRICT, True, "P(Unsafe) + P(Controversial) >= t"),
)


def policy_line(mode: Mode, threshold: float | None) -> str:
    """The Python a user pastes to get this operating point, e.g. ``Policy(unsafe_threshold=0.9)``."""
    if threshold is None:
        return "Policy()" if mode is Mode.STRICT else "Policy.loose()"
    mode_arg = "" if mode is Mode.STRICT else "mode='loose', "
    return f"Policy({mode_arg}unsafe_threshold={threshold!r})"


@dataclass(frozen=True)
class OperatingPoint:
    """The confusion of one rule at one threshold (None: no threshold, the model's own label)."""

    rule: Rule
    threshold: float | None
    confusion: Confusion

    @property
    def expressible(self) -> bool:
        """Whether a ``Policy`` gives this point (not the summed rule, not the threshold 0)."""
        return self.rule.expressible and self.threshold != 0.0

    @property
    def line(self) -> str | None:
        """The ``Policy(...)`` line giving this point, or None when Policy cannot express it."""
        return policy_line(self.rule.mode, self.threshold) if self.expressible else None

    @property
    def policy(self) -> Policy | None:
        """The ``Policy`` giving this point, or None when Policy cannot express it."""
        return self.rule.policy(self.threshold) if self.expressible else None


def short_threshold(low: float, high: float) -> float:
    """The decimal with fewest digits in ``(low, high]``, nearest the middle: a threshold to print.

    Every threshold in the interval between two neighbouring scores makes the same decisions,
    so the sweep names each operating point by the roundest one, away from both scores.
    """
    low_d, high_d = Decimal(repr(low)), Decimal(repr(high))
    middle = (low_d + high_d) / 2
    for digits in range(1, 18):
        step = Decimal(1).scaleb(-digits)
        first = (low_d / step).to_integral_value(ROUND_FLOOR) + 1
        last = (high_d / step).to_integral_value(ROUND_FLOOR)
        if first <= last:
            chosen = float(min(max((middle / step).to_integral_value(), first), last) * step)
            if low < chosen <= high:
                return chosen
    return high


class Curve:
    """The confusion of one rule at any threshold, from the sorted scores of one set's verdicts.

    ``points`` holds every distinct operating point a threshold in (0, 1] reaches, each named
    by a short threshold (see ``short_threshold``), by ascending threshold.
    """

    def __init__(self, rule: Rule, golds: Sequence[bool], verdicts: Sequence[Verdict]) -> None:
        self.rule = rule
        self.positives = sum(golds)
        self.negatives = len(golds) - self.positives
        always = {True: 0, False: 0}
        scores: dict[bool, list[float]] = {True: [], False: []}
        for gold, verdict in zip(golds, verdicts):
            score, flagged = rule.inputs(verdict)
            if flagged:
                always[gold] += 1
            elif score is not None:
                scores[gold].append(score)
        self._always = always
        self._scores = {gold: sorted(values) for gold, values in scores.items()}
        self.points = self._operating_points()

    def at(self, threshold: float) -> Confusion:
        """Counts when everything scoring ``threshold`` or more is unsafe."""
        flagged = {gold: self._always[gold] + len(s) - bisect_left(s, threshold) for gold, s in self._scores.items()}
        return Confusion(tp=flagged[True], fp=flagged[False], fn=self.positives - flagged[True],
                         tn=self.negatives - flagged[False])

    def scores(self) -> list[float]:
        """The distinct scores, ascending: the thresholds at which the confusion changes."""
        return sorted({*self._scores[True], *self._scores[False]})

    def _operating_points(self) -> tuple[OperatingPoint, ...]:
        points, low = [], 0.0
        for score in [*self.scores(), 1.0]:
            high = min(score, 1.0)
            if high > low:
                threshold = short_threshold(low, high)
                points.append(OperatingPoint(self.rule, threshold, self.at(threshold)))
            low = max(low, high)
        return tuple(points)


def _by_f1(point: OperatingPoint) -> tuple[Any, ...]:
    """Best F1, then fewest false positives, then the simplest line (no threshold, strict mode)."""
    return (point.confusion.f1, -point.confusion.fp, point.threshold is None, point.rule.mode is Mode.STRICT,
            point.threshold or 0.0)


def _by_recall(point: OperatingPoint) -> tuple[Any, ...]:
    """Most unsafe content caught, then fewest false positives, then the simplest line."""
    return (point.confusion.recall, *_by_f1(point)[1:])


@dataclass(frozen=True)
class SetSweep:
    """The sweep of one engine on one labelled set, with the ``Policy`` lines it recommends.

    ``defaults`` are ``Policy()`` (strict, the default) and ``Policy.loose()`` on the model's own
    labels; ``best_f1`` is the expressible point with the highest F1 and ``within_fpr`` the one
    catching most unsafe content at a false-positive rate of at most ``max_fpr`` (None when no
    target was given or no Policy line reaches it). ``results`` is the set's ``results.json``
    row (category confusion, Stream stop positions).
    """

    engine: str
    model: str
    dataset: str
    level: str
    without_probabilities: int
    curves: tuple[Curve, ...]
    defaults: tuple[OperatingPoint, ...]
    best_f1: OperatingPoint
    within_fpr: OperatingPoint | None
    max_fpr: float | None
    results: Mapping[str, Any]

    @property
    def labelled(self) -> int:
        """Items with a gold safety label (the only ones a sweep can score)."""
        return self.curves[0].positives + self.curves[0].negatives

    @property
    def positives(self) -> int:
        """Items labelled unsafe."""
        return self.curves[0].positives

    def curve(self, name: str) -> Curve:
        """The curve of the rule called ``name``."""
        return next(c for c in self.curves if c.rule.name == name)

    def candidates(self) -> list[OperatingPoint]:
        """Every point a ``Policy(...)`` line can reach (the defaults and the expressible curves)."""
        return expressible_points(self.curves, self.defaults)


def expressible_points(curves: Sequence[Curve], defaults: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """The ``defaults`` and every point of the curves whose rule ``Policy`` can express."""
    return [*defaults, *(p for c in curves if c.rule.expressible for p in c.points)]


def _applied(rule: Rule, threshold: float | None, golds: Sequence[bool], verdicts: Sequence[Verdict]) -> OperatingPoint:
    """The point scored by applying the rule's ``Policy`` itself to every verdict."""
    policy = rule.policy(threshold)
    counts = confusion((g, policy.effective_level(v) is RiskLevel.UNSAFE) for g, v in zip(golds, verdicts))
    return OperatingPoint(rule, threshold, counts)


def sweep_verdicts(golds: Sequence[bool], verdicts: Sequence[Verdict], *, results: Mapping[str, Any],
                   max_fpr: float | None = None) -> SetSweep:
    """Sweep one set: ``golds[i]`` is True when ``verdicts[i]`` judged content labelled unsafe.

    ``results`` is the set's row of ``results.json`` (engine, model, dataset, level, and the
    category and Stream sections drawn in the report).
    """
    if not golds:
        raise ValueError(f"{results.get('dataset')}: no labelled item to sweep")
    if max_fpr is not None and not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be between 0 and 1, got {max_fpr!r}")
    curves = tuple(Curve(rule, golds, verdicts) for rule in RULES)
    by_name = {rule.name: rule for rule in RULES}
    defaults = tuple(_applied(by_name[name], None, golds, verdicts) for name in ("strict", "loose"))
    candidates = expressible_points(curves, defaults)
    best = max(candidates, key=_by_f1)
    within = [p for p in candidates if max_fpr is not None and p.confusion.fpr <= max_fpr]
    pick = max(within, key=_by_recall) if within else None
    return SetSweep(
        engine=str(results["engine"]), model=str(results.get("model", "")), dataset=str(results["dataset"]),
        level=str(results.get("level", "")),
        without_probabilities=sum(1 for v in verdicts if v.error is not None or not v.probabilities),
        curves=curves, defaults=defaults, best_f1=_applied(best.rule, best.threshold, golds, verdicts),
        within_fpr=None if pick is None else _applied(pick.rule, pick.threshold, golds, verdicts),
        max_fpr=max_fpr, results=results,
    )


def best_of(curve: Curve) -> OperatingPoint | None:
    """The curve's own highest-F1 point (None when no threshold in (0, 1] applies)."""
    return max(curve.points, key=_by_f1) if curve.points else None


def sweep(directory: str | os.PathLike[str], *, max_fpr: float | None = None) -> list[SetSweep]:
    """Sweep every engine and labelled set of a finished ``qwen3guard eval`` output directory.

    Reads ``results.json`` (which predictions each set counted) and ``predictions.jsonl``; no
    model is loaded or run. Sets without safety labels (refusal-only sets) are skipped.
    """
    directory = Path(directory)
    results_path = directory / RESULTS_JSON
    if not results_path.is_file():
        raise FileNotFoundError(f"{directory} has no {RESULTS_JSON}; run qwen3guard eval --out {directory} first")
    try:
        summary = json.loads(results_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{results_path} is not valid JSON; rerun the qwen3guard eval command that made it") from None
    store = PredictionStore(directory)
    sweeps = []
    for row in summary.get("results", []):
        if row.get("strict") is None:
            continue
        keys = row.get("keys")
        if keys is None:
            raise ValueError(f"{results_path} does not list its predictions (written by an older version); "
                             "rerun the qwen3guard eval command that made it")
        missing = sum(1 for k in keys if k not in store.records)
        if missing:
            raise ValueError(f"{missing} predictions counted in {results_path} are missing from {store.path}; "
                             "rerun the qwen3guard eval command that made it")
        records = [store.records[k] for k in keys if store.records[k].get("label_unsafe") is not None]
        sweeps.append(sweep_verdicts([bool(r["label_unsafe"]) for r in records], [verdict_from_record(r) for r in records],
                                     results=row, max_fpr=max_fpr))
    if not sweeps:
        raise ValueError(f"no set in {results_path} has safety labels; nothing to sweep")
    return sweeps
