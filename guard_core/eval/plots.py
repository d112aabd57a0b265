"""The report's plots as PNG bytes, drawn off-screen by matplotlib's Agg canvas.

matplotlib is optional (the ``report`` extra) and imported only when a plot is drawn. Figures
are built with ``matplotlib.figure.Figure`` and rendered by ``FigureCanvasAgg`` directly, so the
caller's pyplot state and backend are never touched. Every plot has a fixed size in pixels
(``SIZES``), which the page uses for its ``<img>`` tags.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Mapping

from .metrics import POSITION_BINS
from .sweep import Curve, OperatingPoint, SetSweep

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'qwen3guard-middleware[report]'"
DPI = 100
#: Width and height in pixels of each kind of plot.
SIZES: dict[str, tuple[int, int]] = {"pr": (600, 540), "f1": (600, 540), "categories": (760, 620), "stops": (600, 440)}
#: The threshold axis is logit-scaled (guard probabilities crowd near 0 and 1) and clipped here.
THRESHOLD_RANGE = (1e-5, 1 - 1e-5)
_THRESHOLD_TICKS = (1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
_STYLES = {"loose": ("tab:blue", "-"), "strict": ("tab:orange", "-"), "strict-sum": ("tab:gray", "--")}
_LABEL_CHARS = 28


def require_matplotlib() -> None:
    """Fail early, in one line, when the optional plotting dependency is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"drawing report.html needs matplotlib: {INSTALL_HINT}") from None


def _figure(kind: str) -> Figure:
    require_matplotlib()
    from matplotlib.figure import Figure

    width, height = SIZES[kind]
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _mark(ax: Any, point: OperatingPoint | None, label: str, style: str) -> None:
    if point is None:
        return
    c = point.confusion
    ax.plot(c.recall, c.precision, style, markersize=11, markeredgecolor="black", label=f"{label}: {point.line}",
            linestyle="none", zorder=5)


def pr_curve(s: SetSweep) -> bytes:
    """Precision against recall for each rule, with the default and recommended points marked."""
    figure = _figure("pr")
    ax = figure.add_subplot()
    for curve in s.curves:
        points = [p.confusion for p in curve.points if p.confusion.tp + p.confusion.fp]
        color, line = _STYLES[curve.rule.name]
        ax.plot([c.recall for c in points], [c.precision for c in points], color=color, linestyle=line, marker=".",
                markersize=4, label=curve.rule.description)
    strict, loose = s.defaults
    _mark(ax, strict, "strict", "k*")
    _mark(ax, loose, "loose", "ws")
    _mark(ax, s.best_f1, "best F1", "rD")
    if s.max_fpr is not None:
        _mark(ax, s.within_fpr, f"FPR <= {s.max_fpr:g}", "g^")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.05), xlabel="recall (share of unsafe content caught)",
           ylabel="precision (share of blocks that were right)", title=f"Precision-recall: {s.engine} on {s.dataset}")
    ax.grid(alpha=0.3)
    figure.legend(fontsize=7.5, loc="outside lower center", ncols=2)
    return _png(figure)


def _f1_steps(curve: Curve) -> tuple[list[float], list[float]]:
    """F1 as the step function it is: constant between neighbouring scores (drawn ``steps-pre``)."""
    low, high = THRESHOLD_RANGE
    xs = [low, *(t for t in curve.scores() if low < t < high), high]
    return xs, [curve.at(t).f1 for t in xs]


def f1_curve(s: SetSweep) -> bytes:
    """F1 against the threshold for each rule, with the model's own strict and loose F1 as lines."""
    figure = _figure("f1")
    ax = figure.add_subplot()
    for curve in s.curves:
        color, line = _STYLES[curve.rule.name]
        xs, ys = _f1_steps(curve)
        ax.plot(xs, ys, color=color, linestyle=line, drawstyle="steps-pre", label=curve.rule.description)
    strict, loose = s.defaults
    ax.axhline(strict.confusion.f1, color="black", linestyle=":", linewidth=1, label=f"Policy() F1 {strict.confusion.f1:.3f}")
    ax.axhline(loose.confusion.f1, color="dimgray", linestyle="-.", linewidth=1,
               label=f"Policy.loose() F1 {loose.confusion.f1:.3f}")
    for point, color, label in ((s.best_f1, "red", "best F1"), (s.within_fpr, "green", f"FPR <= {s.max_fpr or 0:g}")):
        if point is not None and point.threshold is not None:
            ax.axvline(min(max(point.threshold, THRESHOLD_RANGE[0]), THRESHOLD_RANGE[1]), color=color, linewidth=1,
                       label=f"{label}: t = {point.threshold:g}")
    ax.set_xscale("logit")
    ax.set_xticks(_THRESHOLD_TICKS, [f"{t:g}" for t in _THRESHOLD_TICKS], fontsize=8)
    ax.minorticks_off()
    ax.set(xlim=THRESHOLD_RANGE, ylim=(0, 1.05), xlabel="unsafe_threshold t (logit scale)", ylabel="F1",
           title=f"F1 against threshold: {s.engine} on {s.dataset}")
    ax.grid(alpha=0.3)
    figure.legend(fontsize=7.5, loc="outside lower center", ncols=2)
    return _png(figure)


def _short(label: str) -> str:
    return label if len(label) <= _LABEL_CHARS else label[: _LABEL_CHARS - 1] + "…"


def category_heatmap(title: str, cells: Mapping[str, Mapping[str, int]]) -> bytes:
    """Gold categories (rows) against predicted ones (columns); colour is the share of the row."""
    figure = _figure("categories")
    ax = figure.add_subplot()
    rows = list(cells)
    columns = sorted({c for row in cells.values() for c in row})
    counts = [[cells[r].get(c, 0) for c in columns] for r in rows]
    shares = [[n / (sum(row) or 1) for n in row] for row in counts]
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    small = max(5.0, 9.0 - 0.2 * max(len(rows), len(columns)))
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=small,
                        color="white" if shares[i][j] > 0.6 else "black")
    ax.set_xticks(range(len(columns)), [_short(c) for c in columns], rotation=45, ha="right", fontsize=small)
    ax.set_yticks(range(len(rows)), [_short(r) for r in rows], fontsize=small)
    ax.set(xlabel="predicted category (Safe: judged safe)", ylabel="gold category", title=title)
    figure.colorbar(image, ax=ax, label="share of the gold row")
    return _png(figure)


def stop_histogram(title: str, detection: Mapping[str, Any]) -> bytes:
    """Where Stream stopped responses relative to the labelled unsafe span, strict and loose."""
    figure = _figure("stops")
    ax = figure.add_subplot()
    xs = range(len(POSITION_BINS))
    for offset, (mode, color) in zip((-0.2, 0.2), (("strict", "tab:orange"), ("loose", "tab:blue"))):
        ax.bar([x + offset for x in xs], [detection[mode]["bins"][b] for b in POSITION_BINS], width=0.4, color=color,
               label=f"{mode}: {100 * detection[mode]['exact_hit_rate']:.1f}% hit, "
                     f"{100 * detection[mode]['within_128_rate']:.1f}% within 128 tokens")
    from matplotlib.ticker import MaxNLocator

    ax.set_xticks(list(xs), list(POSITION_BINS))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="stop position (tokens after the unsafe span)", ylabel="responses",
           title=f"{title} ({detection['n']} spans)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(figure)
