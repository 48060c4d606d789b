"""Run a reproduction preset: every (cell, column, seed) with the ordinary trainer, then its report.

``reproduce`` skips cells whose dataset is absent (with a note saying how to get it), runs the
rest one after another or ``jobs`` side by side (one thread each), each resumed if it was cut, and
writes ``report.md`` (ours beside the paper's number in every cell) and ``results.json``, with
each run's folder (config, metrics, curves) under the output folder. Presets and budgets:
:mod:`creditflow.jobs.presets`; the report: :mod:`creditflow.jobs.preset_report`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import data
from ..devices import DeviceName
from ..report import plot_curves
from ..train.checkpoint import write_json, write_text
from ..train.config import RunConfig, validate
from ..train.metrics import read_jsonl
from .lanes import run_all
from .preset_report import budget_notes, cell_alignment, to_report
from .presets import (
    ANALYSIS_KEYS,
    BUDGET_META,
    Cell,
    Preset,
    available,
    budget_names,
    budget_of,
    listing,
    load_preset,
)

__all__ = ["ReproduceOptions", "available", "budget_names", "budget_notes", "cell_runs", "listing", "load_preset",
           "reproduce"]

log = logging.getLogger(__name__)


class ReproduceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: str = Field("quick", description="a budget the preset defines: quick (laptop CPU, minutes), cpu "
                        "(this 2-core CPU, up to an hour, where the preset has one) or full (the paper's protocol)")
    data_dir: str | None = Field(None, description="folder holding the datasets")
    out: str | None = Field(None, description="output folder (default runs/reproduce-<preset>-<budget>)")
    device: DeviceName = Field("auto", description="training device: auto, cpu, cuda or cuda:N")

    seeds: int | None = Field(None, ge=1, description="override the budget's number of seeds")
    cells: str | None = Field(None, description="comma-separated cell ids to run (default: all)")
    columns: str | None = Field(None, description="comma-separated columns (rules) to run (default: all)")
    jobs: int | None = Field(None, ge=1, description="runs side by side, one thread each (default: the budget's "
                             "jobs, else 1)")

    def out_dir(self, preset: Preset) -> Path:
        return Path(self.out or f"runs/reproduce-{preset.name}-{self.budget}")


def cell_runs(preset: Preset, cell: Cell, opts: ReproduceOptions) -> tuple[list[str], list[tuple[str, RunConfig]]]:
    """The columns of a cell (those the paper reports) and one (column, RunConfig) per column and seed.

    Settings merge in this order: budget < the cell's ``full`` settings or the budget's
    ``<budget>_overrides`` for the cell < the column's definition (``columns``) < the cell's
    per-column ``settings``. A column may set
    ``model`` (default: the cell's) and ``model_options``; these update the cell's own
    ``model_options`` (for the cell's model), which update the budget's
    ``<budget>_model_options`` for that model (looked up by full spec, then by name before ``:``).
    """
    budget = budget_of(preset, opts.budget)
    seeds = opts.seeds or budget.get("seeds", 1)
    if opts.budget == "full":
        budget.update(cell.full)
    else:
        budget.update(preset.budgets.get(f"{opts.budget}_overrides", {}).get(cell.id, {}))
    for key in BUDGET_META:  # what describes the budget is no run setting, wherever it was written
        budget.pop(key, None)
    budget_model_options = preset.budgets.get(f"{opts.budget}_model_options", {})
    wanted = wanted_columns(preset, opts)
    columns = [c for c in preset.rules if c in cell.paper and (wanted is None or c in wanted)]
    out = opts.out_dir(preset)
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


def wanted_columns(preset: Preset, opts: ReproduceOptions) -> set[str] | None:
    """The columns asked for (``--columns``), else those the budget covers, else None (all)."""
    if opts.columns:
        wanted = opts.columns.split(",")
    else:
        wanted = budget_of(preset, opts.budget).get("columns")
        if wanted is not None and not isinstance(wanted, list):
            raise ValueError(f"budget key columns must be a list, e.g. [{preset.rules[0]}]; got {wanted!r}")
    if wanted is None:
        return None
    if unknown := sorted(set(wanted) - set(preset.rules)):
        raise ValueError(f"unknown column(s) {unknown}; available: {', '.join(preset.rules)}")
    return set(wanted)


def dataset_missing(cell: Cell, opts: ReproduceOptions) -> str | None:
    """None if the cell's dataset can be loaded (quick: without downloading), else why not."""
    try:
        data.load(cell.dataset, data_dir=opts.data_dir, download=opts.budget == "full", val_fraction=0.0)
    except data.DatasetNotFound as err:
        return str(err)
    return None


def reproduce(name: str, opts: ReproduceOptions, *, progress: bool = True) -> dict[str, Any]:
    preset = load_preset(name)
    budget = budget_of(preset, opts.budget)
    out = opts.out_dir(preset)
    # the cells asked for, else those the budget covers (a cpu budget may reach only some), else all
    wanted = set(opts.cells.split(",")) if opts.cells else set(budget.get("cells", [])) or None
    if wanted and (unknown := wanted - {c.id for c in preset.cells}):
        raise ValueError(f"unknown cell(s) {sorted(unknown)}; available: {', '.join(c.id for c in preset.cells)}")
    wanted_columns(preset, opts)  # unknown columns refused before anything loads
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
    jobs = opts.jobs or budget.get("jobs", 1)
    # wall time over every invocation: a resumed preset adds its own to what the cut one recorded
    saved = out / "results.json"
    earlier = json.loads(saved.read_text()).get("wall_seconds", 0.0) if saved.is_file() else 0.0
    started = time.perf_counter()
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    order = run_order(planned, budget.get("first", []), preset)
    probe = None
    if preset.probe:  # a budget may measure less often than the paper (every probe costs ~3 steps)
        probe = preset.probe.model_copy(update={"every": budget.get("probe_every", preset.probe.every)})
    results["jobs"] = jobs
    collect(results, planned, done)
    for (cell_id, column, cfg), summary in run_all(order, jobs, progress, probe):
        done[cell_id, column, cfg.seed] = {**summary, **run_extras(preset, cfg, summary, opts)}
        collect(results, planned, done)
        results["wall_seconds"] = round(earlier + time.perf_counter() - started, 1)
        write_json(out / "results.json", results)  # after every run: a killed preset keeps what it has
    results["wall_seconds"] = round(earlier + time.perf_counter() - started, 1)
    for cell_id, (columns, runs) in planned.items():
        plot_curves({column: [read_jsonl(cfg.out_dir() / "metrics.jsonl") for c, cfg in runs if c == column]
                     for column in columns},
                    out / cell_id / "curves.png", f"{preset.name} {cell_id} ({opts.budget})")
        if probe is not None:
            results["cells"][cell_id]["alignment"] = cell_alignment(out / cell_id, runs, probe,
                                                                    f"{preset.name} {cell_id} ({opts.budget})")
    report = to_report(preset, results, probe)
    write_text(out / "report.md", report)
    write_json(out / "results.json", results)
    results["report"], results["out"] = report, str(out)  # for the caller, not results.json
    return results


def run_order(planned: dict[str, tuple[list[str], list[tuple[str, RunConfig]]]], first: list[str],
              preset: Preset) -> list[tuple[str, str, RunConfig]]:
    """Every planned run, the columns named in ``first`` ahead of the rest, else in the preset's order.

    Side by side, the longest runs should start first (longest-processing-time order): four runs
    of one hour and one of 1.5 hours end after 3.5 hours on two lanes in the preset's order (the
    long one last), after 3 hours with it first.
    """
    if not isinstance(first, list):
        raise ValueError(f"budget key first must be a list of columns, e.g. [{preset.rules[0]}]; got {first!r}")
    if unknown := sorted(set(first) - set(preset.rules)):
        raise ValueError(f"budget key first: unknown column(s) {unknown}; available: {', '.join(preset.rules)}")
    order = [(cell_id, column, cfg) for cell_id, (_, runs) in planned.items() for column, cfg in runs]
    return sorted(order, key=lambda run: run[1] not in first)  # stable: the preset's order otherwise


def collect(results: dict[str, Any], planned: dict[str, tuple[list[str], list[tuple[str, RunConfig]]]],
            done: dict[tuple[str, str, int], dict[str, Any]]) -> None:
    """The finished runs into ``results["cells"]``, in the preset's order of cells, columns and seeds."""
    for cell_id, (columns, runs) in planned.items():
        summaries: dict[str, list[dict]] = {c: [] for c in columns}
        for column, cfg in runs:
            if (cell_id, column, cfg.seed) in done:
                summaries[column].append(done[cell_id, column, cfg.seed])
        results["cells"][cell_id] = {"summaries": summaries}


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
