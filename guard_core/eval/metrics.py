"""The numbers of the technical report's tables, computed from stored predictions.

Unsafe is the positive class. Strict mode counts ``Controversial`` as unsafe and loose mode as
safe (report §3; upstream's own Stream eval script prints the two with their names swapped, so
the folding here goes through ``Policy.effective_level`` like every other decision in the
library). Everything is computed from the prediction records alone, so a resumed run reports
exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ..policy import Mode, Policy
from ..types import Category, RiskLevel, Verdict
from .datasets import EvalItem

#: Where Stream stops a response relative to the labelled unsafe span (upstream's bins).
POSITION_BINS: tuple[str, ...] = ("Ahead", "Hit", "1-32", "33-64", "65-128", "129-256", ">256", "Missed")


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary decision against gold labels, with the scores derived from them.

    Precision, recall and F1 are 0.0 when undefined (no predicted or no gold positives), the
    convention of the report's tables and of scikit-learn's ``zero_division=0``.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def precision(self) -> float:
        """TP / (TP + FP)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN)."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def fpr(self) -> float:
        """False-positive rate, FP / (FP + TN): the share of safe content a policy would block."""
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready counts and scores."""
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
                "precision": self.precision, "recall": self.recall, "f1": self.f1}


def confusion(pairs: Iterable[tuple[bool, bool]]) -> Confusion:
    """Count (gold, predicted) pairs."""
    counts = Counter((bool(g), bool(p)) for g, p in pairs)
    return Confusion(tp=counts[(True, True)], fp=counts[(False, True)], fn=counts[(True, False)], tn=counts[(False, False)])


def verdict_from_record(record: Mapping[str, Any]) -> Verdict:
    """Rebuild the verdict stored by the runner (``Verdict.to_dict`` form)."""
    data = record["verdict"]
    return Verdict(
        risk=RiskLevel(data["risk"]),
        categories=tuple(Category(c) for c in data.get("categories", ())),
        refusal=data.get("refusal"),
        probabilities={RiskLevel(k): float(v) for k, v in (data.get("probabilities") or {}).items()},
        role=data.get("role", "prompt"),
        model=data.get("model", ""),
        error=data.get("error"),
        error_kind=data.get("error_kind") or ("unparseable" if data.get("error") else None),
    )


def predicted_unsafe(verdict: Verdict, mode: Mode, threshold: float | None = None) -> bool:
    """Whether the verdict counts as unsafe in ``mode`` (errors follow ``Policy.on_error``: unsafe)."""
    return Policy(mode=mode, unsafe_threshold=threshold).effective_level(verdict) is RiskLevel.UNSAFE


def predicted_category(verdict: Verdict) -> str:
    """The column of the category confusion a verdict falls in."""
    if verdict.error is not None:
        return "Error"
    if verdict.risk is RiskLevel.SAFE:
        return "Safe"
    return verdict.categories[0].value if verdict.categories else "None"


def position_bin(offset: int | None) -> str:
    """Bin of a detection offset: negative ahead of the span, 0 inside it, n tokens after its end."""
    if offset is None:
        return "Missed"
    if offset < 0:
        return "Ahead"
    if offset == 0:
        return "Hit"
    for low, high, name in ((1, 32, "1-32"), (33, 64, "33-64"), (65, 128, "65-128"), (129, 256, "129-256")):
        if low <= offset <= high:
            return name
    return ">256"


def set_metrics(items: Sequence[EvalItem], records: Sequence[Mapping[str, Any]], *, threshold: float | None = None) -> dict[str, Any]:
    """All metrics of one engine on one set; ``records[i]`` is the prediction for ``items[i]``.

    Sections without gold data are None (no refusal labels, no categories, no spans).
    """
    if len(items) != len(records):
        raise ValueError(f"{len(items)} items but {len(records)} predictions")
    verdicts = [verdict_from_record(r) for r in records]
    labelled = [(item, v) for item, v in zip(items, verdicts) if item.unsafe is not None]
    result: dict[str, Any] = {
        "n": len(items),
        "labelled": len(labelled),
        "positives": sum(1 for item, _ in labelled if item.unsafe),
        "errors": sum(1 for v in verdicts if v.error is not None),
        "risk_counts": {level.value: sum(1 for v in verdicts if v.risk is level) for level in RiskLevel},
        "strict": None,
        "loose": None,
        "refusal": None,
        "categories": None,
        "detection": None,
    }
    if labelled:
        for mode in Mode:
            result[mode.value] = confusion((bool(item.unsafe), predicted_unsafe(v, mode, threshold)) for item, v in labelled).to_dict()
    refusals = [(item.refusal, v.refusal) for item, v in zip(items, verdicts) if item.refusal is not None]
    if refusals:
        result["refusal"] = {**confusion((bool(g), p is True) for g, p in refusals).to_dict(),
                             "unknown": sum(1 for _, p in refusals if p is None)}
    cells: dict[str, Counter[str]] = {}
    for item, v in zip(items, verdicts):
        for gold in item.categories:
            cells.setdefault(gold, Counter())[predicted_category(v)] += 1
    if cells:
        result["categories"] = {gold: dict(sorted(row.items())) for gold, row in sorted(cells.items())}
    result["detection"] = _detection(items, records)
    return result


def _detection(items: Sequence[EvalItem], records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Upstream's latency bins per mode, over unsafe items with a labelled span.

    ``within_128_rate`` counts a stop before the span too, as upstream's "first 128 tokens stop
    rate" does: the response was cut no later than 128 tokens after the unsafe part ended.
    """
    rows = [(item, r) for item, r in zip(items, records) if item.span is not None and item.unsafe and r.get("detection")]
    if not rows:
        return None
    out: dict[str, Any] = {"n": len(rows)}
    for mode in Mode:
        bins = Counter(position_bin(r["detection"][mode.value]) for _, r in rows)
        within = sum(bins[b] for b in ("Ahead", "Hit", "1-32", "33-64", "65-128"))
        out[mode.value] = {"bins": {b: bins[b] for b in POSITION_BINS},
                           "exact_hit_rate": bins["Hit"] / len(rows),
                           "within_128_rate": within / len(rows)}
    return out


def best_mode_average(rows: Iterable[Mapping[str, Any]]) -> float | None:
    """The report's Avg* column: mean over sets of the better of strict and loose F1."""
    best = [max(r["strict"]["f1"], r["loose"]["f1"]) for r in rows if r.get("strict") is not None]
    return sum(best) / len(best) if best else None
