"""Reproduction presets: one YAML per paper table, run with a ``quick`` or ``full`` budget.

A preset lists the table's cells (dataset, model, augmentation, the paper's number per rule) and
two budgets. ``reproduce`` trains every (cell, rule, seed) with the ordinary trainer, skips cells
whose dataset is absent (with a note saying how to get it), and writes ``report.md``: our
mean ± std beside the paper's number in every cell, with each run's resolved config on disk.
A column may train its own model (e.g. BP on the matched twin of an AL network), and ``extras``
add tables read from each finished run: a metric at the selected epoch (AL's associated loss per
component), or a per-layer class-distance quantity from ``creditflow analyze`` (AL's Table 7).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import data
from ..report import (
    fmt,
    fmt_mean_std,
    markdown_row,
    markdown_table,
    mean_std,
    plot_curves,
    save_figure,
)
from ..train.checkpoint import write_json, write_text
from ..train.config import RunConfig, validate
from ..train.metrics import read_jsonl
from ..train.trainer import train

log = logging.getLogger(__name__)


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    dataset: str
    model: str
    augment: str = "none"
    #: options of the cell's model (e.g. a linear and a BatchNorm variant of one spec)
    model_options: dict[str, Any] = Field(default_factory=dict)
    paper: dict[str, float | None]  # None: the paper shows the number only in a figure
    full: dict[str, Any] = Field(default_factory=dict)
    #: per-column run settings for this cell, e.g. the thesis's per-rule learning rates
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict)


class Extra(BaseModel):
    """A report table beyond the test accuracy, read from each finished run.

    ``source: metrics``: the value of ``key`` (e.g. AL's ``assoc_loss/2``, or ``train_acc``) in the
    run's ``metrics.jsonl`` row of the selected epoch (the best validation epoch, as the accuracy).
    ``source: analysis``: ``key`` (``ratio``, ``inter`` or ``intra``) of every layer, from
    :func:`creditflow.jobs.analyze.analyze` run on the finished run with the budget's
    ``<budget>_analysis`` options (a table per cell, one row per layer position).
    """

    model_config = ConfigDict(extra="forbid")

    key: str
    source: Literal["metrics", "analysis"] = "metrics"
    title: str
    #: the paper's numbers: {cell id: {column: value}}
    paper: dict[str, dict[str, float | None]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _analysis_keys(self):
        if self.source == "analysis" and self.key not in ANALYSIS_KEYS:
            raise ValueError(f"an analysis extra's key is one of {', '.join(ANALYSIS_KEYS)}, got {self.key!r}")
        return self


ANALYSIS_KEYS = ("ratio", "inter", "intra")


class Probe(BaseModel):
    """Alignment with BP measured while every run trains (``creditflow align``'s probe): before every
    ``every``-th step, at each block's ``output`` or ``pre-activation``; the report adds the per-epoch
    mean cosine per column (table and figure)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(ge=1)
    at: Literal["output", "pre-activation"] = "output"


class Preset(BaseModel):
    # keys starting with "x-" are free (YAML anchors shared by cells)
    model_config = ConfigDict(extra="allow")

    name: str
    title: str
    paper: str
    rules: list[str]  # column labels: a rule name, or a key of ``columns``
    cells: list[Cell]
    budgets: dict[str, Any]
    #: columns that are a rule with settings, e.g. ``asap-k4: {rule: asap, rule_options: {k: 4}}``
    columns: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: more report tables, from each run's metrics or from an analysis of the finished run
    extras: list[Extra] = Field(default_factory=list)
    probe: Probe | None = None

    @model_validator(mode="after")
    def _only_anchors_extra(self):
        unknown = [k for k in (self.model_extra or {}) if not k.startswith("x-")]
        if unknown:
            raise ValueError(f"unknown preset keys {unknown}; allowed: {', '.join(type(self).model_fields)} "
                             "and x-* anchors")
        cells = {c.id for c in self.cells}
        for extra in self.extras:
            if unknown := sorted(set(extra.paper) - cells):
                raise ValueError(f"extra {extra.key!r}: paper numbers for unknown cell(s) {unknown}")
            if unknown := sorted({r for numbers in extra.paper.values() for r in numbers} - set(self.rules)):
                raise ValueError(f"extra {extra.key!r}: paper numbers for unknown column(s) {unknown}")
        return self


def available() -> list[str]:
    folder = resources.files("creditflow") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> Preset:
    """A packaged preset by name, or a preset YAML file of your own by path."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        text = Path(name).read_text()
    elif name in available():
        text = (resources.files("creditflow") / "presets" / f"{name}.yaml").read_text()
    else:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(available())} (or a path to a .yaml)")
    return Preset.model_validate(yaml.safe_load(text))


class ReproduceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: str = Field("quick", description="a budget the preset defines: quick (laptop CPU, minutes), cpu "
                        "(this 2-core CPU, up to an hour, where the preset has one) or full (the paper's protocol)")
    data_dir: str | None = Field(None, description="folder holding the datasets")
    out: str | None = Field(None, description="output folder (default runs/reproduce-<preset>-<budget>)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="training device")
    seeds: int | None = Field(None, ge=1, description="override the budget's number of seeds")
    cells: str | None = Field(None, description="comma-separated cell ids to run (default: all)")
    columns: str | None = Field(None, description="comma-separated columns (rules) to run (default: all)")
    jobs: int | None = Field(None, ge=1, description="runs side by side, one thread each (default: the budget's "
                             "jobs, else 1)")


#: budget keys that describe the budget rather than set a run's config
BUDGET_META = ("seeds", "minutes", "jobs", "cells", "probe_every")


def budget_names(preset: Preset) -> list[str]:
    """The budgets a preset defines (``quick``, ``cpu``, ``full``...), not their ``<budget>_*`` settings."""
    return [k for k in preset.budgets if "_" not in k]


def budget_of(preset: Preset, name: str) -> dict[str, Any]:
    if name not in budget_names(preset):
        raise ValueError(f"preset {preset.name} has no budget {name!r}; its budgets: {', '.join(budget_names(preset))}")
    return dict(preset.budgets[name])


def listing() -> str:
    """Every packaged preset, its budgets with seeds and the measured wall time on a 2-core CPU."""
    rows = []
    for name in available():
        preset = load_preset(name)
        budgets = []
        for b in budget_names(preset):
            spec = preset.budgets[b]
            minutes = f", ~{spec['minutes']} min" if "minutes" in spec else ""
            budgets.append(f"{b} ({spec.get('seeds', 1)} seed{'s' if spec.get('seeds', 1) > 1 else ''}{minutes})")
        rows.append(markdown_row([name, preset.title, ", ".join(budgets)]))
    return "\n".join([*markdown_table(["preset", "table", "budgets (wall time on a 2-core CPU like CI's: measured where a report is committed, else estimated from step times)"], []),
                      *rows])


def cell_runs(preset: Preset, cell: Cell, opts: ReproduceOptions) -> tuple[list[str], list[tuple[str, RunConfig]]]:
    """The columns of a cell (those the paper reports) and one (column, RunConfig) per column and seed.

    Settings merge in this order: budget < the cell's full-budget or quick overrides < the
    column's definition (``columns``) < the cell's per-column ``settings``. A column may set
    ``model`` (default: the cell's) and ``model_options``; these update the cell's own
    ``model_options`` (for the cell's model), which update the budget's
    ``<budget>_model_options`` for that model (looked up by full spec, then by name before ``:``).
    """
    budget = budget_of(preset, opts.budget)
    seeds = opts.seeds or budget.get("seeds", 1)
    for key in BUDGET_META:
        budget.pop(key, None)
    if opts.budget == "full":
        budget.update(cell.full)
    else:
        budget.update(preset.budgets.get(f"{opts.budget}_overrides", {}).get(cell.id, {}))
    budget_model_options = preset.budgets.get(f"{opts.budget}_model_options", {})
    wanted = set(opts.columns.split(",")) if opts.columns else None
    columns = [c for c in preset.rules if c in cell.paper and (wanted is None or c in wanted)]
    out = Path(opts.out or f"runs/reproduce-{preset.name}-{opts.budget}")
    runs = []
    for column in columns:
        column_settings = {"rule": column, **preset.columns.get(column, {}), **cell.settings.get(column, {})}
        # a column may train another model (BP's matched twin of an al-* model) with its own options
        model = column_settings.pop("model", cell.model)
        model_options = {**budget_model_options.get(model, budget_model_options.get(model.split(":")[0], {})),
                         **(cell.model_options if model == cell.model else {}),
                         **column_settings.pop("model_options", {})}
        for seed in range(seeds):
            values = {**budget, "seed": seed, "dataset": cell.dataset, "model": model, "augment": cell.augment,
                      "model_options": model_options, "data_dir": opts.data_dir, "download": opts.budget == "full",
                      "device": opts.device, **column_settings,
                      "out": str(out / cell.id / column / f"seed{seed}")}
            runs.append((column, validate(RunConfig, values)))
    return columns, runs


def dataset_missing(cell: Cell, opts: ReproduceOptions) -> str | None:
    """None if the cell's dataset can be loaded (quick: without downloading), else why not."""
    try:
        data.load(cell.dataset, data_dir=opts.data_dir, download=opts.budget == "full", val_fraction=0.0)
    except data.DatasetNotFound as err:
        return str(err)
    return None


def reproduce(name: str, opts: ReproduceOptions, *, progress: bool = True) -> dict[str, Any]:
    preset = load_preset(name)
    budget_of(preset, opts.budget)
    out = Path(opts.out or f"runs/reproduce-{preset.name}-{opts.budget}")
    # the cells asked for, else those the budget covers (a cpu budget may reach only some), else all
    wanted = set(opts.cells.split(",")) if opts.cells else set(preset.budgets[opts.budget].get("cells", [])) or None
    if wanted and (unknown := wanted - {c.id for c in preset.cells}):
        raise ValueError(f"unknown cell(s) {sorted(unknown)}; available: {', '.join(c.id for c in preset.cells)}")
    if opts.columns and (unknown := set(opts.columns.split(",")) - set(preset.rules)):
        raise ValueError(f"unknown column(s) {sorted(unknown)}; available: {', '.join(preset.rules)}")
    results: dict[str, Any] = {"preset": preset.name, "budget": opts.budget, "cells": {}}
    missing_data: dict[str, str] = {}
    planned: dict[str, tuple[list[str], list[tuple[str, RunConfig]]]] = {}
    for cell in preset.cells:
        if wanted and cell.id not in wanted:
            continue
        if cell.dataset not in missing_data:
            why = dataset_missing(cell, opts)
            if why:
                missing_data[cell.dataset] = why
        if cell.dataset in missing_data:
            log.warning("skipping %s: dataset %s is absent", cell.id, cell.dataset)
            results["cells"][cell.id] = {"skipped": missing_data[cell.dataset]}
            continue
        planned[cell.id] = cell_runs(preset, cell, opts)
    jobs = opts.jobs or preset.budgets[opts.budget].get("jobs", 1)
    started = time.perf_counter()
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    order = [(cell_id, column, cfg) for cell_id, (_, runs) in planned.items() for column, cfg in runs]
    probe = None
    if preset.probe:  # a budget may measure less often than the paper (every probe costs ~3 steps)
        probe = {**preset.probe.model_dump(), "every": preset.budgets[opts.budget].get("probe_every", preset.probe.every)}
    for (cell_id, column, cfg), summary in run_all(order, jobs, progress, probe):
        done[cell_id, column, cfg.seed] = {**summary, **run_extras(preset, cfg, summary, opts)}
        collect(results, planned, done)
        write_json(out / "results.json", results)  # after every run: a killed preset keeps what it has
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["jobs"] = jobs
    for cell_id, (columns, runs) in planned.items():
        plot_curves({f"{column} s{cfg.seed}": read_jsonl(cfg.out_dir() / "metrics.jsonl") for column, cfg in runs},
                    out / cell_id / "curves.png", f"{preset.name} {cell_id} ({opts.budget})")
        if preset.probe:
            results["cells"][cell_id]["alignment"] = cell_alignment(out / cell_id, runs, Probe(**probe),
                                                                    f"{preset.name} {cell_id} ({opts.budget})")
    report = to_report(preset, results, opts)
    write_text(out / "report.md", report)
    write_json(out / "results.json", results)
    results["report"] = report
    return results


def collect(results: dict[str, Any], planned: dict[str, tuple[list[str], list[tuple[str, RunConfig]]]],
            done: dict[tuple[str, str, int], dict[str, Any]]) -> None:
    """The finished runs into ``results["cells"]``, in the preset's order of cells, columns and seeds."""
    for cell_id, (columns, runs) in planned.items():
        summaries: dict[str, list[dict]] = {c: [] for c in columns}
        for column, cfg in runs:
            if (cell_id, column, cfg.seed) in done:
                summaries[column].append(done[cell_id, column, cfg.seed])
        results["cells"][cell_id] = {"summaries": summaries}


def run_one(cfg: RunConfig, column: str, probe: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    """One run of the preset, resumed if it was cut (with the alignment probe when the preset has one)."""
    callbacks = []
    if probe is not None:
        from .align import AlignmentProbe

        callbacks.append(AlignmentProbe(column, probe["every"], probe["at"], cfg.out_dir()))
    return train(cfg, resume=True, progress=progress, callbacks=callbacks)


def run_all(order: list[tuple[str, str, RunConfig]], jobs: int, progress: bool, probe: dict[str, Any] | None = None):
    """Yield ``(run, summary)`` as each run finishes: in order in this process (``jobs`` 1), else
    ``jobs`` processes side by side with one thread each (on a small CPU two 1-thread runs beat one
    2-thread run; docs/reproduction/README.md has the measurement). Each run resumes if it was cut."""
    if jobs == 1:
        for item in order:
            log.info("%s: %s seed %d", *item[:2], item[2].seed)
            yield item, run_one(item[2], item[1], probe, progress)
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread_worker) as pool:
        futures = {pool.submit(run_one, cfg, column, probe, False): (cell_id, column, cfg)
                   for cell_id, column, cfg in order}
        for future in as_completed(futures):
            item = futures[future]
            summary = future.result()
            log.info("%s: %s seed %d done, test %.4f", *item[:2], item[2].seed, summary["test_acc"])
            yield item, summary


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
    write_text(folder / "alignment-epochs.csv", "rule,epoch,block,cosine,std,seeds\n" + "".join(
        f"{r['rule']},{r['epoch']},{r['block']},{r['cosine']},{r['std']},{r['seeds']}\n" for r in rows))
    try:
        fig = plot_epoch_means(rows, f"{title}: cosine with BP at each block's {probe.at}, per-epoch mean",
                               {(r["rule"], r["epoch"], r["block"]): r["std"] for r in rows})
    except ImportError:
        return rows
    save_figure(fig, folder / "alignment.png")
    return rows


def alignment_report(preset: Preset, results: dict[str, Any]) -> list[str]:
    """Per cell: each column's per-epoch mean cosine with BP at its first and last epoch, and its peak."""
    every = preset.budgets[results["budget"]].get("probe_every", preset.probe.every)
    lines = [f"Alignment with BP (cosine at each block's {preset.probe.at}, measured every {every} "
             "steps, averaged per epoch, then mean ± std over seeds): first epoch -> last epoch (peak epoch "
             "mean). Figure: `<cell>/alignment.png`; numbers: `<cell>/alignment-epochs.csv`."]
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
                first, last, peak = mine[0], mine[-1], max(mine, key=lambda r: r["cosine"])
                row.append(f"{first['cosine']:.3f} ± {first['std']:.3f} (ep {first['epoch']}) -> "
                           f"{last['cosine']:.3f} ± {last['std']:.3f} (ep {last['epoch']}); peak {peak['cosine']:.3f}"
                           f" (ep {peak['epoch']})")
            lines.append(markdown_row([column, *row]))
    return lines


def _one_thread_worker() -> None:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def run_extras(preset: Preset, cfg: RunConfig, summary: dict[str, Any], opts: ReproduceOptions) -> dict[str, Any]:
    """What the preset's extras read from a finished run: ``{"metrics": {key: value}, "layers": [...]}``."""
    out: dict[str, Any] = {}
    run = cfg.out_dir()
    keys = [e.key for e in preset.extras if e.source == "metrics"]
    if keys:
        rows = read_jsonl(run / "metrics.jsonl")
        row = next((r for r in rows if r["epoch"] == summary["best_epoch"]), {})
        out["metrics"] = {k: row.get(k) for k in keys}
    if any(e.source == "analysis" for e in preset.extras):
        from .analyze import AnalyzeOptions, analyze

        options = {"plot": False, "tsne": False, **preset.budgets.get(f"{opts.budget}_analysis", {}),
                   "device": opts.device, "data_dir": opts.data_dir}
        saved = run / "analysis" / "analysis.json"
        if saved.is_file() and saved.stat().st_mtime >= (run / "checkpoint.pt").stat().st_mtime:
            result = json.loads(saved.read_text())  # analysed after the last epoch: a rerun only rewrites the report
        else:
            result = analyze(run, AnalyzeOptions(**options))
        out["layers"] = [{k: layer[k] for k in ("layer", "dim", *ANALYSIS_KEYS)} for layer in result["layers"]]
    return out


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


def to_report(preset: Preset, results: dict[str, Any], opts: ReproduceOptions) -> str:
    budget = {k: v for k, v in preset.budgets[opts.budget].items() if k not in ("minutes", "jobs", "cells", "probe_every")}
    lines = [
        f"# {preset.title} — `{opts.budget}` budget",
        "",
        f"Paper: {preset.paper}. Cells: ours as mean ± std of the test accuracy at the best validation "
        "epoch over seeds, with the paper's number in brackets. Budget: "
        + ", ".join(f"{k}={v}" for k, v in budget.items())
        + budget_notes(preset, opts.budget)
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
    if preset.probe:
        lines += ["", *alignment_report(preset, results)]
    if notes:
        lines += ["", "Skipped cells:", *notes]
    return "\n".join(lines) + "\n"


def extra_report(preset: Preset, extra: Extra, results: dict[str, Any]) -> list[str]:
    """An extra's table(s): metrics, cells by columns; analysis, per cell, layers by columns."""
    ran = [(cell, results["cells"][cell.id]["summaries"]) for cell in preset.cells
           if "summaries" in results["cells"].get(cell.id, {})]
    if extra.source == "metrics":
        lines = [f"{extra.title}: ours at the selected epoch, mean ± std over seeds (the paper's number in "
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
