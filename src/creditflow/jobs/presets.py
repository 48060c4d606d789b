"""Reproduction presets: one YAML per paper table, its cells, columns and budgets.

A preset lists the table's cells (dataset, model, augmentation, the paper's number per rule) and
its budgets (``quick``, ``cpu``, ``full``...: run settings, with ``seeds``, ``cells``, ``jobs``
and a ``minutes`` estimate beside them). A column may train its own model (e.g. BP on the matched
twin of an AL network), ``extras`` add tables read from each finished run, and ``probe`` measures
alignment with BP while every run trains. :mod:`creditflow.jobs.reproduce` runs them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..report import markdown_row, markdown_table


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


#: budget keys that describe the budget rather than set a run's config (``first``: columns whose
#: runs start first, the longest ones, so that the ``jobs`` lanes end near each other; ``cells`` and
#: ``columns``: the part of the table a budget covers, when the command names none)
BUDGET_META = ("seeds", "minutes", "jobs", "cells", "columns", "probe_every", "first")


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
    header = ("budgets (wall time on a 2-core CPU like CI's: measured where a report is committed, "
              "else estimated from step times)")
    return "\n".join([*markdown_table(["preset", "table", header], []), *rows])
