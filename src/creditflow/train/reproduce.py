"""Reproduction presets: one YAML per paper table, run with a ``quick`` or ``full`` budget.

A preset lists the table's cells (dataset, model, augmentation, the paper's number per rule) and
two budgets. ``reproduce`` trains every (cell, rule, seed) with the ordinary trainer, skips cells
whose dataset is absent (with a note saying how to get it), and writes ``report.md``: our
mean ± std beside the paper's number in every cell, with each run's resolved config on disk.
"""

from __future__ import annotations

import logging
import statistics
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import data
from .checkpoint import write_json, write_text
from .config import RunConfig, validate
from .loop import train

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

    @model_validator(mode="after")
    def _only_anchors_extra(self):
        unknown = [k for k in (self.model_extra or {}) if not k.startswith("x-")]
        if unknown:
            raise ValueError(f"unknown preset keys {unknown}; allowed: {', '.join(type(self).model_fields)} "
                             "and x-* anchors")
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


def cell_runs(preset: Preset, cell: Cell, opts: ReproduceOptions) -> tuple[list[str], list[tuple[str, RunConfig]]]:
    """The columns of a cell (those the paper reports) and one (column, RunConfig) per column and seed.

    Settings merge in this order: budget < the cell's full-budget or quick overrides < the
    column's definition (``columns``) < the cell's per-column ``settings``.
    """
    budget = dict(preset.budgets[opts.budget])
    seeds = opts.seeds or budget.pop("seeds", 1)
    budget.pop("seeds", None)
    if opts.budget == "full":
        budget.update(cell.full)
    else:
        budget.update(preset.budgets.get("quick_overrides", {}).get(cell.id, {}))
    model_options = preset.budgets.get(f"{opts.budget}_model_options", {}).get(cell.model, {})
    columns = [c for c in preset.rules if c in cell.paper]
    out = Path(opts.out or f"runs/reproduce-{preset.name}-{opts.budget}")
    runs = []
    for column in columns:
        column_settings = {"rule": column, **preset.columns.get(column, {}), **cell.settings.get(column, {})}
        for seed in range(seeds):
            values = {**budget, "seed": seed, "dataset": cell.dataset, "model": cell.model, "augment": cell.augment,
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
            summaries[column].append(train(cfg, resume=True, progress=progress))
        results["cells"][cell.id] = {"summaries": summaries}
        write_json(out / "results.json", results)  # after every cell: a killed run keeps what it has
    report = to_report(preset, results, opts)
    write_text(out / "report.md", report)
    write_json(out / "results.json", results)
    results["report"] = report
    return results


def paper_number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def to_report(preset: Preset, results: dict[str, Any], opts: ReproduceOptions) -> str:
    budget = preset.budgets[opts.budget]
    lines = [
        f"# {preset.title} — `{opts.budget}` budget",
        "",
        f"Paper: {preset.paper}. Cells: ours as mean ± std of the test accuracy at the best validation "
        "epoch over seeds, with the paper's number in brackets. Budget: "
        + ", ".join(f"{k}={v}" for k, v in budget.items())
        + ". Each run's resolved config is in `<cell>/<rule>/seed<k>/config.yaml`.",
        "",
        "| cell | " + " | ".join(preset.rules) + " |",
        "|---|" + "---|" * len(preset.rules),
    ]
    notes = []
    for cell in preset.cells:
        entry = results["cells"].get(cell.id)
        if entry is None:
            continue
        if "skipped" in entry:
            lines.append(f"| {cell.id} | " + " | ".join(
                f"skipped ({paper_number(cell.paper[r])})" if r in cell.paper else "–" for r in preset.rules) + " |")
            notes.append(f"- `{cell.id}` skipped: {entry['skipped']}")
            continue
        cells = []
        for r in preset.rules:
            runs = entry["summaries"].get(r)
            if not runs:
                cells.append("–")
                continue
            accs = [s["test_acc"] for s in runs]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.fmean(accs):.4f} ± {std:.4f} ({paper_number(cell.paper[r])})")
        lines.append(f"| {cell.id} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Skipped cells:", *notes]
    return "\n".join(lines) + "\n"
