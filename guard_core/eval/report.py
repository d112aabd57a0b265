"""Turning stored predictions into the report's tables, a JSON document and a CSV sheet."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .datasets import EvalSet
from .metrics import POSITION_BINS, best_mode_average, set_metrics
from .runner import Engine, PredictionStore

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def summarize(
    sets: Sequence[EvalSet], engines: Sequence[Engine], store: PredictionStore, *, threshold: float | None = None
) -> dict[str, Any]:
    """Metrics of every engine on every set, plus the report's Avg* per engine and level.

    Each row lists the ``keys`` of the predictions it counted, so a later threshold sweep
    (``qwen3guard eval report DIR``) reads exactly these from ``predictions.jsonl``.
    """
    rows = []
    for engine in engines:
        for s in sets:
            records = [store.get(engine.name, item) for item in s.items]
            missing = sum(1 for r in records if r is None)
            if missing:
                raise ValueError(f"{missing} items of {s.name} have no {engine.name} prediction; run the evaluation first")
            rows.append({"engine": engine.name, "model": engine.model_id, "dataset": s.name, "level": s.spec.level,
                         "set_size": s.total, **set_metrics(s.items, records, threshold=threshold),  # type: ignore[arg-type]
                         "keys": [PredictionStore.key(engine.name, item) for item in s.items]})
    averages = {
        engine.name: {level: best_mode_average(r for r in rows if r["engine"] == engine.name and r["level"] == level)
                      for level in ("prompt", "response")}
        for engine in engines
    }
    return {"threshold": threshold, "results": rows, "best_mode_average_f1": averages}


def percent(value: float | None) -> str:
    """A share as the tables print it (one decimal, ``-`` when undefined)."""
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text tables: safety F1 per set and mode, then refusal, categories and Stream stops."""
    rows = summary["results"]
    lines = ["F1 / precision / recall in percent; unsafe is the positive class; "
             "strict counts Controversial as unsafe, loose as safe."]
    header = ("engine", "dataset", "level", "n", "pos", "err", "F1 strict", "P/R strict", "F1 loose", "P/R loose")
    table = []
    for r in rows:
        if r["strict"] is None:
            continue
        s, lo = r["strict"], r["loose"]
        table.append((r["engine"], r["dataset"], r["level"], str(r["labelled"]), str(r["positives"]), str(r["errors"]),
                      percent(s["f1"]), f"{percent(s['precision'])}/{percent(s['recall'])}",
                      percent(lo["f1"]), f"{percent(lo['precision'])}/{percent(lo['recall'])}"))
    for engine, levels in summary["best_mode_average_f1"].items():
        for level, value in levels.items():
            if value is not None:
                table.append((engine, "Avg* (best mode)", level, "", "", "", percent(value), "", "", ""))
    if table:
        lines += ["", *grid(header, table)]
    refusal = [(r["engine"], r["dataset"], str(r["refusal"]["tp"] + r["refusal"]["fn"]), percent(r["refusal"]["f1"]),
                percent(r["refusal"]["precision"]), percent(r["refusal"]["recall"]), str(r["refusal"]["unknown"]))
               for r in rows if r["refusal"] is not None]
    if refusal:
        lines += ["", "Refusal detection (refusal is the positive class):",
                  *grid(("engine", "dataset", "refusals", "F1", "P", "R", "no answer"), refusal)]
    for r in rows:
        if r["categories"]:
            columns = sorted({c for row in r["categories"].values() for c in row})
            body = [(gold, *[str(row.get(c, 0)) for c in columns]) for gold, row in r["categories"].items()]
            lines += ["", f"Categories, {r['engine']} on {r['dataset']} (rows: gold, columns: predicted):",
                      *grid(("gold \\ predicted", *columns), body)]
    for r in rows:
        if r["detection"]:
            d = r["detection"]
            body = [(mode, *[str(d[mode]["bins"][b]) for b in POSITION_BINS],
                     percent(d[mode]["exact_hit_rate"]), percent(d[mode]["within_128_rate"])) for mode in ("strict", "loose")]
            lines += ["", f"Stream stop position vs the unsafe span, {r['engine']} on {r['dataset']} ({d['n']} spans):",
                      *grid(("mode", *POSITION_BINS, "hit %", "<=128 %"), body)]
    return "\n".join(lines)


def grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table with aligned columns."""
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)]


def write_results(summary: dict[str, Any], directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``results.json`` (everything) and ``results.csv`` (one flat row per engine and set)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / RESULTS_JSON, directory / RESULTS_CSV
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    fields = ["engine", "model", "dataset", "level", "set_size", "n", "labelled", "positives", "errors"]
    sections = ("strict", "loose", "refusal")
    metrics = ("tp", "fp", "fn", "tn", "precision", "recall", "f1")
    columns = fields + [f"{s}_{m}" for s in sections for m in metrics]
    with open(csv_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in summary["results"]:
            flat = {k: r[k] for k in fields}
            for s in sections:
                for m in metrics:
                    flat[f"{s}_{m}"] = "" if r[s] is None else r[s][m]
            writer.writerow(flat)
    return json_path, csv_path
