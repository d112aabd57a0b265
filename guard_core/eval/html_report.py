"""``report.html``: one self-contained page with the sweep's plots and recommendations.

Every image is a PNG embedded as a base64 ``data:`` URI and the style sheet is inline, so the
page opens offline in any browser, can be mailed as one file, and loads nothing from anywhere.
Per engine and set: the operating points with their ``Policy(...)`` lines, the precision-recall
curve, F1 against the threshold, the category confusion as a heat map (sets with gold
categories) and, for Stream, where it stopped responses relative to the unsafe span.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Callable, Sequence

from . import plots
from .report import percent
from .sweep import RULES, SetSweep
from .thresholds import describe, notes, summary_rows

REPORT_HTML = "report.html"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1320px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem;
  border-bottom: 1px solid #ddd; padding-bottom: .3rem; }
code { background: #f3f3f3; padding: 0 .25rem; border-radius: 3px; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child, td:last-child { text-align: left; }
.meta, .note { color: #555; } .recommended { font-size: 1.05rem; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; }
"""


def _plot_jobs(s: SetSweep) -> list[tuple[str, str, Callable[[], bytes]]]:
    """``(kind, caption, draw)`` for every plot of one set, in page order."""
    title = f"{s.engine} on {s.dataset}"
    jobs: list[tuple[str, str, Callable[[], bytes]]] = [
        ("pr", "Precision against recall as the threshold moves; markers are the model's own strict and loose "
               "labels and the recommended lines.", lambda: plots.pr_curve(s)),
        ("f1", "F1 against unsafe_threshold (logit axis: guard probabilities crowd near 0 and 1).",
         lambda: plots.f1_curve(s)),
    ]
    categories = s.results.get("categories")
    if categories:
        jobs.append(("categories", "Gold categories (rows) against the predicted Qwen3Guard category; numbers are "
                                   "counts, colour the share of the row.",
                     lambda: plots.category_heatmap(f"Categories: {title}", categories)))
    detection = s.results.get("detection")
    if detection:
        jobs.append(("stops", "Where Stream stopped each response, relative to the labelled unsafe span.",
                     lambda: plots.stop_histogram(f"Stream stop position: {title}", detection)))
    return jobs


def _image(kind: str, caption: str, png: bytes) -> str:
    width, height = plots.SIZES[kind]
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure style="max-width: {width}px"><img src="data:image/png;base64,{data}" width="{width}" '
            f'height="{height}" '
            f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _section(s: SetSweep, images: Sequence[str]) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(line)}</code></td><td>{percent(p.confusion.f1)}</td>"
        f"<td>{percent(p.confusion.precision)}</td><td>{percent(p.confusion.recall)}</td>"
        f"<td>{percent(p.confusion.fpr)}</td><td>{html.escape(note)}</td></tr>"
        for line, p, note in summary_rows(s))
    caveats = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes(s))
    return (f'<section><h2>{html.escape(s.engine)} on {html.escape(s.dataset)}</h2>'
            f'<p class="meta">{html.escape(describe(s))}</p>'
            f"<table><tr><th>policy</th><th>F1</th><th>precision</th><th>recall</th><th>FPR</th><th></th></tr>"
            f"{rows}</table>{caveats}"
            f'<p class="recommended">Recommended for this data: <code>{html.escape(str(s.best_f1.line))}</code></p>'
            f'<div class="plots">{"".join(images)}</div></section>')


def render(sweeps: Sequence[SetSweep], *, source: str = "", progress: bool = True) -> str:
    """The whole page as text; draws every plot (a progress bar on stderr unless ``progress`` is off)."""
    from tqdm import tqdm

    jobs = [(s, _plot_jobs(s)) for s in sweeps]
    sections = []
    with tqdm(total=sum(len(j) for _, j in jobs), unit="plot", desc="report.html", disable=not progress,
              dynamic_ncols=True) as bar:
        for s, plot_jobs in jobs:
            images = []
            for kind, caption, draw in plot_jobs:
                images.append(_image(kind, caption, draw()))
                bar.update(1)
            sections.append(_section(s, images))
    rules = "".join(f"<li><code>{html.escape(r.description)}</code>"
                    f"{'' if r.expressible else ' (no Policy line expresses it; shown for comparison)'}</li>"
                    for r in RULES)
    origin = f" from <code>{html.escape(source)}</code>" if source else ""
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Qwen3Guard threshold report</title><style>{_STYLE}</style></head><body>"
            f"<h1>Qwen3Guard threshold report</h1><p class=\"meta\">Stored predictions{origin}; unsafe is the "
            "positive class; FPR is the share of safe content blocked. Curves, one point per threshold "
            f"<code>t</code>:</p><ul>{rules}</ul>{''.join(sections)}</body></html>\n")


def write_report(sweeps: Sequence[SetSweep], path: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Draw the plots and write ``report.html`` to ``path``."""
    plots.require_matplotlib()
    path = Path(path)
    page = render(sweeps, source=str(path.parent), progress=progress)
    path.write_text(page, encoding="utf-8")
    return path
