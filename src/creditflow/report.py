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


#: line style per curve: train solid, validation dashed, test dotted
CURVES = (("train_acc", "-", "train"), ("val_acc", "--", "validation"), ("test_acc", ":", "test"))


def plot_curves(runs: dict[str, list[dict] | list[list[dict]]], path: str | Path, title: str = "") -> bool:
    """Training curves per epoch: train loss (left) and accuracy (right), one colour per rule.

    ``runs``: ``{rule: metrics rows}`` of one run, or ``{rule: [rows of each seed]}``. Several
    seeds give the mean line and a band from the lowest to the highest seed (over the epochs every
    seed reached); train solid, validation dashed, test dotted; the legend outside the axes; integer
    epochs. False, writing nothing, when matplotlib is absent: the curves are a convenience beside
    ``metrics.jsonl``."""
    try:
        Figure = figure_class()
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    handles = []
    for k, (name, seeds) in enumerate(runs.items()):
        seeds = [seeds] if seeds and isinstance(seeds[0], dict) else list(seeds)
        color = f"C{k % 10}"
        label = name if len(seeds) == 1 else f"{name} (mean of {len(seeds)} seeds, band: min-max)"
        handles.append(Line2D([], [], color=color, label=label))
        for ax, key, style in ((loss_ax, "train_loss", "-"), *((acc_ax, key, style) for key, style, _ in CURVES)):
            epochs, mean, low, high = _across_seeds(seeds, key)
            if epochs:
                ax.plot(epochs, mean, color=color, linestyle=style, marker="o", markersize=2.5, linewidth=1.4)
                if len(seeds) > 1:
                    ax.fill_between(epochs, low, high, color=color, alpha=0.15, linewidth=0)
    handles += [Line2D([], [], color="0.3", linestyle=style, label=word) for _, style, word in CURVES]
    loss_ax.set(xlabel="epoch", ylabel="train loss", title=title)
    acc_ax.set(xlabel="epoch", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    save_figure(fig, path)
    return True


def _across_seeds(seeds: list[list[dict]], key: str):
    """Epochs every seed has ``key`` for, and the mean, min and max over seeds at each."""
    per_seed = [{r["epoch"]: r[key] for r in rows if r.get(key) is not None} for rows in seeds]
    epochs = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    values = [[d[e] for d in per_seed] for e in epochs]
    return epochs, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]
