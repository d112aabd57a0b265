"""The sweep as text and as ``thresholds.csv``: the ``Policy(...)`` line to use, and why.

The printed summary names, per engine and set, the model's own strict and loose operating
points, the best-F1 line, the line meeting the false-positive target, and the best point of
the summed rule that ``Policy`` cannot express (for comparison only). The CSV holds every curve
on a 0.01 grid plus those picked points, each row with the ``Policy(...)`` line that gives it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

from .report import grid, percent
from .sweep import GRID, Curve, OperatingPoint, SetSweep, best_of

THRESHOLDS_CSV = "thresholds.csv"

_COLUMNS = ("engine", "model", "dataset", "level", "rule", "threshold", "policy",
            "tp", "fp", "fn", "tn", "precision", "recall", "f1", "fpr", "pick")


def _same(a: OperatingPoint | None, b: OperatingPoint) -> bool:
    return a is not None and (a.rule.name, a.threshold) == (b.rule.name, b.threshold)


def _tags(s: SetSweep, point: OperatingPoint, curve_best: OperatingPoint | None) -> str:
    tags = [tag for tag, pick in (("best_f1", curve_best), ("recommended", s.best_f1), ("max_fpr", s.within_fpr))
            if _same(pick, point)]
    return ";".join(tags)


def _row(s: SetSweep, point: OperatingPoint, pick: str) -> dict[str, object]:
    c = point.confusion
    return {"engine": s.engine, "model": s.model, "dataset": s.dataset, "level": s.level, "rule": point.rule.name,
            "threshold": "" if point.threshold is None else point.threshold, "policy": point.line or "",
            "tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn, "precision": c.precision, "recall": c.recall,
            "f1": c.f1, "fpr": c.fpr, "pick": pick}


def _curve_rows(s: SetSweep, curve: Curve) -> list[dict[str, object]]:
    best = best_of(curve)
    picked = [p for p in (best, s.best_f1, s.within_fpr) if p is not None and p.rule is curve.rule]
    points = {t: OperatingPoint(curve.rule, t, curve.at(t)) for t in GRID}
    points.update({p.threshold: p for p in picked if p.threshold is not None})
    return [_row(s, points[t], _tags(s, points[t], best)) for t in sorted(points)]


def write_thresholds(sweeps: Sequence[SetSweep], path: str | os.PathLike[str]) -> Path:
    """Write ``thresholds.csv``: every rule of every set on the grid, plus the picked points."""
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_COLUMNS)
        writer.writeheader()
        for s in sweeps:
            writer.writerows(_row(s, p, _tags(s, p, None)) for p in s.defaults)
            for curve in s.curves:
                writer.writerows(_curve_rows(s, curve))
    return path


def summary_rows(s: SetSweep) -> list[tuple[str, OperatingPoint, str]]:
    """``(how to get it, point, what it is)`` for the operating points worth showing a user."""
    strict, loose = s.defaults
    rows = [(str(strict.line), strict, "the model's labels, strict (the default)"),
            (str(loose.line), loose, "the model's labels, loose"),
            (str(s.best_f1.line), s.best_f1, "best F1")]
    if s.within_fpr is not None:
        rows.append((str(s.within_fpr.line), s.within_fpr, f"most unsafe caught at FPR <= {percent(s.max_fpr)}%"))
    summed = best_of(s.curve("strict-sum"))
    if summed is not None:
        rows.append((f"P(Unsafe) + P(Controversial) >= {summed.threshold}", summed,
                     "not expressible as a Policy line: for comparison only"))
    return rows


def notes(s: SetSweep) -> list[str]:
    """Caveats of one set's sweep: an unreachable false-positive target, verdicts without probabilities."""
    found = []
    if s.max_fpr is not None and s.within_fpr is None:
        lowest = min(s.candidates(), key=lambda p: (p.confusion.fpr, -p.confusion.recall))
        found.append(f"no Policy line keeps FPR <= {percent(s.max_fpr)}% on this set; the lowest is "
                     f"{percent(lowest.confusion.fpr)}% with {lowest.line}")
    if s.without_probabilities:
        found.append(f"{s.without_probabilities} verdicts carry no probabilities (errors, or a server without "
                     "logprobs): every threshold keeps their label")
    return found


def describe(s: SetSweep) -> str:
    """What was swept: the level, the label counts and the model."""
    return f"{s.level}; {s.labelled} labelled, {s.positives} unsafe; {s.model}"


def format_sweep(sweeps: Sequence[SetSweep]) -> str:
    """The printed summary: per engine and set, the operating points and the recommended line."""
    lines = ["Threshold sweep: F1, precision, recall and false-positive rate in percent (unsafe is the positive class)."]
    for s in sweeps:
        body = [(line, percent(p.confusion.f1), percent(p.confusion.precision), percent(p.confusion.recall),
                 percent(p.confusion.fpr), note) for line, p, note in summary_rows(s)]
        table = grid(("policy", "F1", "P", "R", "FPR", ""), body)
        lines += ["", f"{s.engine} on {s.dataset} ({describe(s)})", *("  " + line for line in table)]
        lines += [f"  {note}" for note in notes(s)]
        lines.append(f"  recommended: {s.best_f1.line}")
    return "\n".join(lines)
