"""What every job writes besides its numbers: markdown tables, CSV text, formatted values, figures.

Figures use matplotlib's ``Figure`` class, never pyplot, so a job touches no global backend or
figure state (a library call inside someone's notebook must not close their figures), and are
written atomically with no date or software stamps: the same results give the same files.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from .files import atomic_write


def fmt(value: float | None, spec: str = ".4g", missing: str = "n/a", suffix: str = "") -> str:
    return missing if value is None else format(value, spec) + suffix


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None  # JSON has no NaN


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_mean_std(values: Iterable[float | None], spec: str = ".4f", std_spec: str | None = None) -> str:
    """``mean ± std`` of the values that are not None; the value alone when there is one (a single
    seed has no spread to claim); ``n/a`` when none are."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    mean, std = mean_std(values)
    return f"{mean:{spec}} ± {std:{std_spec or spec}}"


def markdown_row(cells: Iterable[object]) -> str:
    # An empty cell stays "| |": the corner of a table whose header names the columns only.
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def markdown_table(header: Sequence[object], rows: Iterable[Iterable[object]]) -> list[str]:
    """The lines of a markdown table: header, rule, one line per row."""
    return [markdown_row(header), "|" + "---|" * len(header), *map(markdown_row, rows)]


def csv_text(header: Sequence[object], rows: Iterable[Iterable[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def figure_class(instead: str = "pass --no-plot to skip them"):
    """matplotlib's ``Figure`` class, or an ImportError naming the extra and what to do ``instead``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"figures need matplotlib: pip install 'creditflow[plot]' (or {instead})") from None
    return Figure


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` atomically in the format its suffix names (``.png``, ``.svg``, ...)."""
    from matplotlib import rc_context

    path = Path(path)
    fmt_ = path.suffix[1:]
    metadata = {"Date": None} if fmt_ == "svg" else {"Software": None}
    with rc_context({"svg.hashsalt": "creditflow"}):  # unsalted, SVG element ids are random at every save
        atomic_write(path, lambda f: fig.savefig(f, format=fmt_, dpi=110, bbox_inches="tight", metadata=metadata))


def plot_curves(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> bool:
    """Training curves: loss (left) and accuracy (right) per epoch, one colour per run name
    (``{name: metrics rows}``; train solid, validation dashed, test dotted). False, writing nothing,
    when matplotlib is absent: the curves are a convenience beside ``metrics.jsonl``."""
    try:
        Figure = figure_class()
    except ImportError:
        return False
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for k, (name, rows) in enumerate(runs.items()):
        color = f"C{k % 10}"
        epochs = [r["epoch"] for r in rows]
        loss_ax.plot(epochs, [r["train_loss"] for r in rows], color=color, marker="o", markersize=3, label=name)
        for key, style in (("train_acc", "-"), ("val_acc", "--"), ("test_acc", ":")):
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                acc_ax.plot(*zip(*points), color=color, linestyle=style, marker="o", markersize=3,
                            label=f"{name} {key.split('_')[0]}")
    loss_ax.set(xlabel="epoch", ylabel="train loss", title=title)
    acc_ax.set(xlabel="epoch", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="small", ncol=1 + len(runs) // 4)
    save_figure(fig, path)
    return True
