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
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import data
from ..train.checkpoint import write_json, write_text
from ..train.config import RunConfig, validate
from ..train.metrics import read_jsonl
from ..train.trainer import train
from ..report import fmt, fmt_mean_std, markdown_row, markdown_table

log = logging.getLogger(__name__)


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    dataset: str
    model: str
    augment: str = "none"
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

    budget: Literal["quick", "full"] = Field("quick", description="quick (laptop CPU) or full (the paper's protocol)")
    data_dir: str | None = Field(None, description="folder holding the datasets")
    out: str | None = Field(None, description="output folder (default runs/reproduce-<preset>-<budget>)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="training device")
    seeds: int | None = Field(None, ge=1, description="override the budget's number of seeds")
    cells: str | None = Field(None, description="comma-separated cell ids to run (default: all)")
    columns: str | None = Field(None, description="comma-separated columns (rules) to run (default: all)")


def cell_runs(preset: Preset, cell: Cell, opts: ReproduceOptions) -> tuple[list[str], list[tuple[str, RunConfig]]]:
    """The columns of a cell (those the paper reports) and one (column, RunConfig) per column and seed.

    Settings merge in this order: budget < the cell's full-budget or quick overrides < the
    column's definition (``columns``) < the cell's per-column ``settings``. A column may set
    ``model`` (default: the cell's) and ``model_options``; these update the budget's
    ``<budget>_model_options`` for that model (looked up by full spec, then by name before ``:``).
    """
    budget = dict(preset.budgets[opts.budget])
    seeds = opts.seeds or budget.pop("seeds", 1)
    budget.pop("seeds", None)
    if opts.budget == "full":
        budget.update(cell.full)
    else:
        budget.update(preset.budgets.get("quick_overrides", {}).get(cell.id, {}))
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
    out = Path(opts.out or f"runs/reproduce-{preset.name}-{opts.budget}")
    wanted = set(opts.cells.split(",")) if opts.cells else None
    if wanted and (unknown := wanted - {c.id for c in preset.cells}):
        raise ValueError(f"unknown cell(s) {sorted(unknown)}; available: {', '.join(c.id for c in preset.cells)}")
    if opts.columns and (unknown := set(opts.columns.split(",")) - set(preset.rules)):
        raise ValueError(f"unknown column(s) {sorted(unknown)}; available: {', '.join(preset.rules)}")
    results: dict[str, Any] = {"preset": preset.name, "budget": opts.budget, "cells": {}}
    missing_data: dict[str, str] = {}
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
        columns, runs = cell_runs(preset, cell, opts)
        summaries: dict[str, list[dict]] = {c: [] for c in columns}
        for column, cfg in runs:
            log.info("%s: %s seed %d", cell.id, column, cfg.seed)
            summary = train(cfg, resume=True, progress=progress)
            summaries[column].append({**summary, **run_extras(preset, cfg, summary, opts)})
        results["cells"][cell.id] = {"summaries": summaries}
        write_json(out / "results.json", results)  # after every cell: a killed run keeps what it has
    report = to_report(preset, results, opts)
    write_text(out / "report.md", report)
    write_json(out / "results.json", results)
    results["report"] = report
    return results


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
    overrides = (preset.budgets.get("quick_overrides", {}) if budget == "quick"
                 else {c.id: c.full for c in preset.cells if c.full})
    parts = [(label, settings) for label, settings in (
        ("Per-cell overrides", overrides), ("Model options", preset.budgets.get(f"{budget}_model_options", {})))
        if settings]
    return "".join(f". {label}: " + "; ".join(f"{key}: " + ", ".join(f"{o}={v}" for o, v in values.items())
                                              for key, values in settings.items())
                   for label, settings in parts)


def to_report(preset: Preset, results: dict[str, Any], opts: ReproduceOptions) -> str:
    budget = preset.budgets[opts.budget]
    lines = [
        f"# {preset.title} — `{opts.budget}` budget",
        "",
        f"Paper: {preset.paper}. Cells: ours as mean ± std of the test accuracy at the best validation "
        "epoch over seeds, with the paper's number in brackets. Budget: "
        + ", ".join(f"{k}={v}" for k, v in budget.items())
        + budget_notes(preset, opts.budget)
        + ". Each run's resolved config is in `<cell>/<rule>/seed<k>/config.yaml`.",
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
