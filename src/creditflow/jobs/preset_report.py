"""The report of a reproduced preset: ``report.md``'s tables, and the per-cell alignment figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import (
    csv_text,
    fmt,
    fmt_mean_std,
    markdown_row,
    markdown_table,
    mean_std,
    save_figure,
)
from ..train.checkpoint import write_text
from ..train.config import RunConfig
from ..train.metrics import read_jsonl
from .presets import BUDGET_META, Extra, Preset, Probe


def cell_alignment(folder: Path, runs: list[tuple[str, RunConfig]], probe: Probe, title: str) -> list[dict[str, Any]]:
    """Per (column, epoch, block): the mean over seeds of each run's per-epoch mean cosine, its std and
    the number of seeds; written as ``alignment-epochs.csv`` and drawn as ``alignment.png``."""
    from .align import epoch_means, plot_epoch_means

    per_run: dict[tuple[str, int, int], list[float]] = {}
    for column, cfg in runs:
        for m in epoch_means(read_jsonl(cfg.out_dir() / "alignment.jsonl")):
            if m["cosine"] is not None:
                per_run.setdefault((column, m["epoch"], m["block"]), []).append(m["cosine"])
    rows = []
    for (column, epoch, block), values in per_run.items():
        mean, std = mean_std(values)
        rows.append({"rule": column, "epoch": epoch, "block": block, "cosine": mean, "std": std, "seeds": len(values)})
    keys = ("rule", "epoch", "block", "cosine", "std", "seeds")
    write_text(folder / "alignment-epochs.csv", csv_text(keys, ([r[k] for k in keys] for r in rows)))
    if not rows:  # nothing measured (no run of this cell carried the probe)
        return rows
    try:
        fig = plot_epoch_means(rows, f"{title}: cosine with BP at each block's {probe.at}, per-epoch mean",
                               {(r["rule"], r["epoch"], r["block"]): r["std"] for r in rows})
    except ImportError:
        return rows
    save_figure(fig, folder / "alignment.png")
    return rows


def alignment_report(preset: Preset, results: dict[str, Any], probe: Probe) -> list[str]:
    """Per cell: each column's per-epoch mean cosine with BP at its first and last epoch, and its peak."""
    lines = [f"Alignment with BP (cosine at each block's {probe.at}, measured every {probe.every} "
             "steps, averaged per epoch, then mean ± sample std over seeds): first epoch -> last epoch (peak epoch "
             "mean). Figure: `<cell>/alignment.png`; numbers: `<cell>/alignment-epochs.csv`."]

    def value(r):  # one seed has no spread to claim
        return f"{r['cosine']:.3f}" + (f" ± {r['std']:.3f}" if r["seeds"] > 1 else "")

    for cell in preset.cells:
        rows = results["cells"].get(cell.id, {}).get("alignment")
        if not rows:
            continue
        blocks = sorted({r["block"] for r in rows})
        lines += ["", f"`{cell.id}`:", "", *markdown_table(["column", *(f"block {b}" for b in blocks)], [])]
        for column in dict.fromkeys(r["rule"] for r in rows):
            row = []
            for b in blocks:
                mine = sorted((r for r in rows if r["rule"] == column and r["block"] == b), key=lambda r: r["epoch"])
                if not mine:  # the block got no signal in this column (Shallow's frozen blocks)
                    row.append("–")
                    continue
                first, last, peak = mine[0], mine[-1], max(mine, key=lambda r: r["cosine"])
                row.append(f"{value(first)} (ep {first['epoch']}) -> {value(last)} (ep {last['epoch']}); "
                           f"peak {peak['cosine']:.3f} (ep {peak['epoch']})")
            lines.append(markdown_row([column, *row]))
    return lines


def budget_notes(preset: Preset, budget: str) -> str:
    """The budget's per-cell overrides and model options, as report text (empty when there are none)."""
    overrides = (preset.budgets.get(f"{budget}_overrides", {}) if budget != "full"
                 else {c.id: c.full for c in preset.cells if c.full})
    parts = [(label, settings) for label, settings in (
        ("Per-cell overrides", overrides), ("Model options", preset.budgets.get(f"{budget}_model_options", {})))
        if settings]
    return "".join(f". {label}: " + "; ".join(f"{key}: " + ", ".join(f"{o}={v}" for o, v in values.items())
                                              for key, values in settings.items())
                   for label, settings in parts)


def to_report(preset: Preset, results: dict[str, Any], probe: Probe | None = None) -> str:
    name = results["budget"]
    # the run settings, and the seeds; not what only describes the budget (its cells, jobs, time)
    budget = {k: v for k, v in preset.budgets[name].items() if k == "seeds" or k not in BUDGET_META}
    lines = [
        f"# {preset.title} — `{name}` budget",
        "",
        f"Paper: {preset.paper}. Cells: ours as mean ± sample std (n - 1) of the test accuracy at the best validation "
        "epoch over seeds, with the paper's number in brackets. Budget: "
        + ", ".join(f"{k}={v}" for k, v in budget.items())
        + budget_notes(preset, name)
        + ". Each run's resolved config is in `<cell>/<rule>/seed<k>/config.yaml`, its metrics and curves "
        "beside it; `<cell>/curves.png` draws every run of a cell."
        + (f" Wall time {results['wall_seconds'] / 60:.1f} min, {results['jobs']} run(s) side by side."
           if "wall_seconds" in results else ""),
        "",
        *markdown_table(["cell", *preset.rules], []),
    ]
    notes = []
    for cell in preset.cells:
        entry = results["cells"].get(cell.id)
        if entry is None:
            continue
        if "skipped" in entry:
            lines.append(markdown_row([cell.id, *(f"skipped ({fmt(cell.paper[r], '.4f')})" if r in cell.paper else "–"
                                                  for r in preset.rules)]))
            notes.append(f"- `{cell.id}` skipped: {entry['skipped']}")
            continue
        cells = []
        for r in preset.rules:
            runs = entry["summaries"].get(r)
            if not runs:
                cells.append("–")
                continue
            cells.append(f"{fmt_mean_std(s['test_acc'] for s in runs)} ({fmt(cell.paper[r], '.4f')})")
        lines.append(markdown_row([cell.id, *cells]))
    for extra in preset.extras:
        lines += ["", *extra_report(preset, extra, results)]
    if probe is not None:
        lines += ["", *alignment_report(preset, results, probe)]
    if notes:
        lines += ["", "Skipped cells:", *notes]
    return "\n".join(lines) + "\n"


def extra_report(preset: Preset, extra: Extra, results: dict[str, Any]) -> list[str]:
    """An extra's table(s): metrics, cells by columns; analysis, per cell, layers by columns."""
    ran = [(cell, results["cells"][cell.id]["summaries"]) for cell in preset.cells
           if "summaries" in results["cells"].get(cell.id, {})]
    if extra.source == "metrics":
        lines = [f"{extra.title}: ours at the selected epoch, mean ± sample std over seeds (the paper's number in "
                 "brackets).", "", *markdown_table(["cell", *preset.rules], [])]
        for cell, summaries in ran:
            paper = extra.paper.get(cell.id, {})
            row = []
            for r in preset.rules:
                runs = summaries.get(r)
                if not runs:
                    row.append("–")
                    continue
                ours = fmt_mean_std((s.get("metrics", {}).get(extra.key) for s in runs), ".4g", ".2g")
                row.append(f"{ours} ({fmt(paper[r], '.4g')})" if r in paper else ours)
            lines.append(markdown_row([cell.id, *row]))
        return lines
    lines = [f"{extra.title}: `{extra.key}` of each layer's features (`creditflow analyze`), mean ± std over "
             "seeds; layers in forward order, `input` first, each column's layers lined up with the deepest "
             "column's by feature size (a layer with no counterpart shows –)."]
    for cell, summaries in ran:
        columns = [r for r in preset.rules if summaries.get(r)]
        ref = max(columns, key=lambda r: len(summaries[r][0].get("layers", [])))  # the deepest column sets the rows
        depth = len(summaries[ref][0].get("layers", []))
        lines += ["", f"`{cell.id}`:", "", *markdown_table(["#", *columns], [])]
        rows = {r: align_layers(summaries[ref][0].get("layers", []), summaries[r][0].get("layers", []))
                for r in columns}
        for i in range(depth):
            row = []
            for r in columns:
                j = rows[r].get(i)
                layers = [] if j is None else [s["layers"][j] for s in summaries[r] if j < len(s.get("layers", []))]
                row.append(f"{fmt_mean_std((x[extra.key] for x in layers), '.4g', '.2g')} ({layers[0]['layer']})"
                           if layers else "–")
            lines.append(markdown_row([i, *row]))
        if paper := extra.paper.get(cell.id):
            lines.append(markdown_row(["paper", *(fmt(paper.get(r), ".4g") for r in columns)]))
    return lines


def align_layers(ref: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[int, int]:
    """``{row in ref: index in other}``: the longest common subsequence of the two lists' feature sizes.

    A BP twin and its AL network share every layer's size except where one holds a layer the other
    has not (e.g. the BP block that is a whole bridge, where AL also shows the bridge's hidden layer).
    """
    a, b = [x["dim"] for x in ref], [x["dim"] for x in other]
    best = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]  # best[i][j]: LCS length of a[i:], b[j:]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            best[i][j] = best[i + 1][j + 1] + 1 if a[i] == b[j] else max(best[i + 1][j], best[i][j + 1])
    out, i, j = {}, 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            out[i] = j
            i, j = i + 1, j + 1
        elif best[i + 1][j] >= best[i][j + 1]:
            i += 1
        else:
            j += 1
    return out
