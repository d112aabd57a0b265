"""Evaluation harness: Qwen3Guard Gen and Stream on public safety sets, the report's way.

``python -m guard_core.eval --help`` (or ``qwen3guard eval``) is the command line; ``evaluate``
is the same thing for code that already holds a guard (a local ``GenGuard``, a remote Gen
client, a ``StreamGuard``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .datasets import REGISTRY, REPORT_SETS, DatasetSpec, EvalItem, EvalSet, file_spec, load_set, select_specs
from .report import format_table, summarize, write_results
from .runner import Engine, GenBackend, GenEngine, PredictionStore, StreamEngine, open_store, run


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
    "StreamEngine",
    "evaluate",
    "file_spec",
    "format_table",
    "load_set",
    "select_specs",
    "summarize",
    "write_results",
]
