"""Evaluation harness: Qwen3Guard Gen and Stream on public safety sets, the report's way.

``python -m guard_core.eval --help`` (or ``qwen3guard eval``) is the command line; ``evaluate``
is the same thing for code that already holds a guard (a local ``GenGuard``, a remote Gen
client, a ``StreamGuard``). ``sweep`` and ``threshold_report`` answer "which ``Policy`` for my
data" from a finished output directory, without running a model (``qwen3guard eval report DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .datasets import REGISTRY, REPORT_SETS, DatasetSpec, EvalItem, EvalSet, file_spec, load_set, select_specs
from .html_report import REPORT_HTML, write_report
from .plots import require_matplotlib
from .report import format_table, summarize, write_results
from .runner import Engine, GenBackend, GenEngine, PredictionStore, StreamEngine, open_store, run
from .sweep import SetSweep, sweep
from .thresholds import THRESHOLDS_CSV, format_sweep, write_thresholds


def evaluate(
    sets: Sequence[EvalSet],
    engines: Sequence[Engine],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    progress: bool = True,
    fresh: bool = False,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``engines`` on ``sets``, then write and return the results.

    The returned summary is what ``results.json`` holds, plus ``table`` (the printed text) and
    ``files`` (the JSON and CSV paths).
    """
    if not engines:
        raise ValueError("no engine to evaluate: pass a GenEngine and/or a StreamEngine")
    store = open_store(out, engines, fresh=fresh)
    run(sets, engines, store, batch_size=batch_size, progress=progress)
    summary = summarize(sets, engines, store, threshold=threshold)
    files = write_results(summary, Path(out))
    return {**summary, "table": format_table(summary), "files": files}


def threshold_report(
    directory: str | os.PathLike[str], *, max_fpr: float | None = None, progress: bool = True
) -> dict[str, Any]:
    """Sweep the stored predictions of ``directory``; write ``thresholds.csv`` and ``report.html``.

    Loads and runs no model: everything comes from ``results.json`` and ``predictions.jsonl``.
    Returns ``sweeps`` (one ``SetSweep`` per engine and labelled set), ``text`` (the printed
    summary with the recommended ``Policy(...)`` lines) and ``files`` (the CSV and HTML paths).
    """
    require_matplotlib()
    directory = Path(directory)
    sweeps = sweep(directory, max_fpr=max_fpr)
    files = (write_thresholds(sweeps, directory / THRESHOLDS_CSV),
             write_report(sweeps, directory / REPORT_HTML, progress=progress))
    return {"sweeps": sweeps, "text": format_sweep(sweeps), "files": files}


__all__ = [
    "REGISTRY",
    "REPORT_SETS",
    "DatasetSpec",
    "Engine",
    "EvalItem",
    "EvalSet",
    "GenBackend",
    "GenEngine",
    "PredictionStore",
    "SetSweep",
    "StreamEngine",
    "evaluate",
    "file_spec",
    "format_sweep",
    "format_table",
    "load_set",
    "select_specs",
    "summarize",
    "sweep",
    "threshold_report",
    "write_report",
    "write_results",
    "write_thresholds",
]
