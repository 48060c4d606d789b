"""Train rules from one initialisation and track how their signals align with BP (LAS paper, Fig. 4).

Every rule trains through the one trainer (same seed: same initial weights, same batches; its run
folder under ``runs/``) with :class:`AlignmentProbe` attached: at steps 0, ``every``, 2 ``every``, ...
and after the last step, :func:`creditflow.diagnostics.measure` compares the signal each hidden
block receives with BP's gradient on the current batch. Test accuracy is the trainer's (at the best
validation epoch). Writes
``alignment.jsonl`` (one line per rule, measurement and block), ``alignment.csv``, ``summary.json``,
``config.yaml`` and the plots ``alignment.{png,svg}`` (cosine per block against the step, one line
per rule) and, when a rule has feedback matrices, ``alignment-weights.{png,svg}``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from .. import data
from ..devices import resolve_device
from ..diagnostics import measure
from ..report import csv_text, figure_class, finite, fmt, save_figure
from ..rules import parse_spec as parse_rule_spec
from ..train.checkpoint import write_json, write_text
from ..train.config import RunConfig, config_key
from ..train.metrics import read_jsonl, write_jsonl
from ..train.runfolder import claim
from ..train.trainer import Callback, DataInfo, build_rule, train

log = logging.getLogger(__name__)


class AlignConfig(RunConfig):
    """Several rules, one model and dataset, alignment with BP measured while training."""

    rules: list[str] = Field(default_factory=lambda: ["dfa"],
                             description="rules to measure, comma-separated; per-rule options after colons, "
                                         "e.g. dfa:feedback_init=product,fa")
    every: int = Field(50, ge=1, description="training steps between measurements")
    at: Literal["output", "pre-activation"] = Field(
        "output", description="where each block's signal is read: its output h_i, or the input of its final "
        "activation (delta_i = s_i * f'(a_i), the LAS paper's Fig. 4)")
    plot: bool = Field(True, description="write alignment.png/.svg (needs matplotlib)")
    out: str | None = Field(None, description="output folder (default runs/align-<dataset>-<hash of the config>)")

    @field_validator("rules", mode="before")
    @classmethod
    def _rules(cls, v):
        specs = [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else [str(s) for s in v]
        if not specs:
            raise ValueError("rules must name at least one rule")
        for spec in specs:
            parse_rule_spec(spec)
        if len(set(specs)) < len(specs):
            raise ValueError(f"rules must differ (each is a line in the plot), got {', '.join(specs)}")
        return specs

    @field_validator("parallel")
    @classmethod
    def _parallel(cls, v):
        if v != "none":  # the probe compares every rule with BP on one batch in one process
            raise ValueError(f"align runs in one process; got parallel={v!r} (allowed: none). "
                             "To check alignment under DDP, measure a rule trained with --parallel ddp "
                             "(see docs/parallel.md)")
        return v

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/align-{self.dataset}-{config_key(self)}")

    def run(self, spec: str) -> RunConfig:
        """The run of one rule: ``rule_options`` for every rule, then the spec's own options; its own folder."""
        name, options = parse_rule_spec(spec)
        fields = self.model_dump(exclude={"rules", "every", "at", "plot", "out", "rule", "rule_options"})
        folder = self.out_dir() / "runs" / re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)
        return RunConfig(**fields, rule=name, rule_options={**self.rule_options, **options}, out=str(folder))


def align(cfg: AlignConfig, *, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train every rule in ``cfg.rules``, measuring alignment; write the results and return the summary."""
    if cfg.plot:
        figure_class("pass --no-plot for the JSONL/CSV only")  # fail before training, not after
    cfg = cfg.model_copy(update={"out": str(cfg.out_dir())})
    config = cfg.model_dump(mode="json", exclude={"rule"})  # `rules` says which
    with claim(cfg.out_dir(), cfg, overwrite=overwrite, exclude={"rule"}):
        return _align(cfg, config, progress, overwrite)


def _align(cfg: AlignConfig, config: dict[str, Any], progress: bool, overwrite: bool) -> dict[str, Any]:
    out = cfg.out_dir()
    device = resolve_device(cfg.device)
    splits = data.load(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                       val_fraction=cfg.val_fraction, seed=cfg.seed)
    info = DataInfo(tuple(splits.shape), splits.num_classes, len(splits.train))
    for spec in cfg.rules:  # bad rule options fail now, not after the first rule has trained
        build_rule(cfg.run(spec), info, device)
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"config": config, "rules": {}}
    for spec in cfg.rules:
        rule_rows, test_acc = train_and_measure(spec, cfg, progress, overwrite)
        rows += rule_rows
        summary["rules"][spec] = summarize(rule_rows, test_acc)
        write_results(out, rows, summary)  # after each rule: a killed run keeps the finished ones
    if cfg.plot:
        for name, fig in plot_alignment(rows).items():
            for ext in ("png", "svg"):
                save_figure(fig, out / f"{name}.{ext}")
    return summary


class AlignmentProbe(Callback):
    """The trainer's callback of this job: before steps 0, ``every``, 2 ``every``, ... it compares the
    signal each hidden block receives with BP's gradient on that step's batch, and once more after
    the last step (the trained network, on the last batch; its rows carry ``final``).

    With ``folder`` the rows are written to ``folder/alignment.jsonl`` at every epoch's end, and a
    resumed run reads back those of the epochs its checkpoint holds: a long probe survives a kill.
    ``folder/probe.json`` records ``every`` and ``at``; a run resumed with other settings, or one
    trained without the probe, is refused (its rows would mix two measurements).
    """

    def __init__(self, spec: str, every: int, at: str = "output", folder: Path | None = None):
        self.spec, self.every, self.at = spec, every, at
        self.path = Path(folder) / "alignment.jsonl" if folder is not None else None
        self.rows: list[dict[str, Any]] = []
        self.epoch, self.last = 1, None

    def on_fit_start(self, trainer):
        if self.path is None:
            return
        settings, saved = {"every": self.every, "at": self.at}, self.path.parent / "probe.json"
        if trainer.global_step:
            if not saved.is_file():
                raise ValueError(f"{self.path.parent} was trained without the alignment probe; measuring from here "
                                 "on would leave its first epochs out: start it in another folder")
            if (before := json.loads(saved.read_text())) != settings:
                raise ValueError(f"{self.path.parent} was measured with every={before['every']}, at={before['at']}, "
                                 f"not every={self.every}, at={self.at}: use its settings or another folder")
            # rows of steps the checkpoint does not hold (after it was written) are measured again
            self.rows = [r for r in read_jsonl(self.path) if r["step"] < trainer.global_step and not r.get("final")]
        write_json(saved, settings)

    def on_epoch_start(self, trainer, epoch):
        self.epoch = epoch + 1

    def around_step(self, trainer, step, x, y, run):
        if step % self.every == 0:
            self.rows += records(self.spec, self.epoch, step, measure(trainer.rule, x, y, self.at))
        self.last = (x, y)
        return run()

    def on_epoch_end(self, trainer, row):
        mine = [r for r in self.rows if r["epoch"] == row["epoch"]]
        means = epoch_means(mine)
        log.info("%s epoch %d: test %s, mean cosine this epoch %s", self.spec, row["epoch"],
                 fmt(row["test_acc"], ".3f"), " ".join(f"block{m['block']} {fmt(m['cosine'], '.3f')}" for m in means))
        self._save()

    def on_checkpoint(self, trainer):
        self._save()  # a mid-epoch checkpoint: the rows up to it resume with it

    def on_fit_end(self, trainer, summary):
        if self.last is not None:  # step = number of updates
            self.rows += records(self.spec, trainer.cfg.epochs, trainer.global_step,
                                 measure(trainer.rule, *self.last, self.at), final=True)
        self._save()

    def _save(self):
        if self.path is not None:
            write_jsonl(self.path, self.rows)


def train_and_measure(spec: str, cfg: AlignConfig, progress: bool, overwrite: bool = False):
    """One rule through the trainer (its own run folder under ``out/runs/``) with the probe attached;
    a run cut short resumes where its checkpoint is (probe rows included)."""
    run = cfg.run(spec)
    probe = AlignmentProbe(spec, cfg.every, cfg.at, run.out_dir())
    summary = train(run, progress=progress, callbacks=[probe], overwrite=overwrite, resume=not overwrite)
    return probe.rows, summary["test_acc"]


def records(spec: str, epoch: int, step: int, result, final: bool = False) -> list[dict[str, Any]]:
    angles = {k: finite(v) for k, v in result.weight_angle_deg.items()}
    extra = {"final": True} if final else {}
    return [{"rule": spec, "epoch": epoch, "step": step, "block": i, "cosine": finite(c),
             "weight_angle_deg": angles, **extra} for i, c in enumerate(result.block_cosine)]


def epoch_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (rule, epoch, block): the mean cosine over that epoch's measurements (the LAS paper's
    Fig. 4 plots this: "the average alignment for the minibatches in each epoch"); the measurement
    after the last step is not part of any epoch's mean. ``n`` counts the measurements averaged."""
    groups: dict[tuple[str, int, int], list[float]] = {}
    for r in rows:
        if r.get("final"):
            continue
        values = groups.setdefault((r["rule"], r["epoch"], r["block"]), [])
        if r["cosine"] is not None:
            values.append(r["cosine"])
    return [{"rule": rule, "epoch": epoch, "block": block, "cosine": statistics.fmean(v) if v else None, "n": len(v)}
            for (rule, epoch, block), v in groups.items()]


def summarize(rows: list[dict[str, Any]], test_acc: float | None) -> dict[str, Any]:
    """Per block: the cosine at step 0 and its mean over the last epoch's measurements."""
    last_epoch = max(r["epoch"] for r in rows)
    blocks = sorted({r["block"] for r in rows})

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    by_epoch = epoch_means(rows)
    return {
        "test_acc": test_acc,
        "steps": max(r["step"] for r in rows),
        "epoch_cosine": [[m["cosine"] for m in by_epoch if m["block"] == b] for b in blocks],
        "first_cosine": [mean(r["cosine"] for r in rows if r["block"] == b and r["step"] == 0) for b in blocks],
        "last_epoch_cosine": [next((m["cosine"] for m in by_epoch if m["block"] == b and m["epoch"] == last_epoch),
                                   None) for b in blocks],
        "last_weight_angle_deg": rows[-1]["weight_angle_deg"],
    }


def to_markdown(summary: dict[str, Any]) -> str:
    rules = summary["rules"]
    n = max(len(s["first_cosine"]) for s in rules.values())
    lines = ["Cosine with BP per hidden block: at step 0 -> mean over the last epoch's measurements.", "",
             "| rule | test acc | " + " | ".join(f"block {b}" for b in range(n)) + " |",
             "|---|---|" + "---|" * n]
    for spec, s in rules.items():
        cells = [f"{fmt(a, '.3f')} -> {fmt(b, '.3f')}" for a, b in zip(s["first_cosine"], s["last_epoch_cosine"])]
        lines.append(f"| {spec} | {fmt(s['test_acc'], '.3f')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    names = sorted({k for r in rows for k in r["weight_angle_deg"]})
    return csv_text(["rule", "epoch", "step", "block", "cosine", *(f"weight_angle_deg.{k}" for k in names)],
                    ([r["rule"], r["epoch"], r["step"], r["block"], r["cosine"],
                      *(r["weight_angle_deg"].get(k) for k in names)] for r in rows))


def write_results(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    write_text(out / "alignment.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text(out / "alignment.csv", to_csv(rows))
    write_text(out / "alignment-epochs.csv", epochs_csv(epoch_means(rows)))
    write_json(out / "summary.json", summary)


def epochs_csv(means: list[dict[str, Any]]) -> str:
    keys = ("rule", "epoch", "block", "cosine", "n")
    return csv_text(keys, ([m[k] for k in keys] for m in means))


def plot_epoch_means(means: list[dict[str, Any]], title: str = "", spread: dict | None = None):
    """Per-epoch mean cosine with BP against the epoch, one panel per block, one line per rule
    (the LAS paper's Fig. 4 form). ``spread``: ``{(rule, epoch, block): std}`` drawn as a band."""
    Figure = figure_class("pass --no-plot for the JSONL/CSV only")
    rules = list(dict.fromkeys(m["rule"] for m in means))
    blocks = sorted({m["block"] for m in means})
    fig = Figure(figsize=(4.2 * len(blocks) + 1.8, 3.2), layout="constrained")
    axes = fig.subplots(1, len(blocks), squeeze=False, sharey=True)[0]
    handles = {}
    for ax, b in zip(axes, blocks):
        for k, rule in enumerate(rules):
            pts = sorted((m["epoch"], m["cosine"]) for m in means
                         if m["rule"] == rule and m["block"] == b and m["cosine"] is not None)
            if not pts:
                continue
            epochs, values = zip(*pts)
            (handles[rule],) = ax.plot(epochs, values, color=f"C{k % 10}", linewidth=1.4, label=rule)
            if spread:
                std = [spread.get((rule, e, b), 0.0) for e in epochs]
                ax.fill_between(epochs, [v - s for v, s in zip(values, std)], [v + s for v, s in zip(values, std)],
                                color=f"C{k % 10}", alpha=0.2, linewidth=0)
        ax.set_title(f"block {b}" + (" (first hidden)" if b == 0 else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean cosine with BP")
        ax.grid(alpha=0.3)
    fig.legend([handles[r] for r in rules if r in handles], [r for r in rules if r in handles],
               loc="outside right upper", fontsize="small")  # one entry per rule, not per panel
    if title:
        fig.suptitle(title)
    return fig


def plot_alignment(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"alignment": figure}`` (one panel per block) plus ``"alignment-weights"`` if there are angles."""
    Figure = figure_class("pass --no-plot for the JSONL/CSV only")
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    color = {spec: f"C{k % 10}" for k, spec in enumerate(rules)}  # one colour per rule in every panel
    blocks = sorted({r["block"] for r in rows})
    ncols = min(len(blocks), 3)
    nrows = math.ceil(len(blocks) / ncols)
    fig = Figure(figsize=(4.2 * ncols + 1.8, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).flatten()
    handles = {}
    for ax, b in zip(axes, blocks):
        for spec in rules:
            pts = [(r["step"], r["cosine"]) for r in rows if r["rule"] == spec and r["block"] == b
                   and r["cosine"] is not None]  # none: the block gets no signal (Shallow)
            if pts:
                (handles[spec],) = ax.plot(*zip(*pts), color=color[spec], marker="o", markersize=2.5,
                                           linewidth=1.2, label=spec)
        ax.axhline(0.0, color="0.6", linewidth=0.6, linestyle="--")
        ax.set_title(f"block {b}" + (" (first hidden)" if b == 0 else ""))
        ax.set_xlabel("training step")
        ax.set_ylabel("cosine with BP gradient")
        ax.grid(alpha=0.3)
    for ax in axes[len(blocks):]:
        ax.set_visible(False)
    axes[0].set_ylim(top=1.05)
    fig.legend([handles[s] for s in rules if s in handles], [s for s in rules if s in handles],
               loc="outside right upper", fontsize="small")
    figures = {"alignment": fig}
    means = epoch_means(rows)
    if len({m["epoch"] for m in means}) > 1:
        figures["alignment-epochs"] = plot_epoch_means(means, "mean cosine with BP per epoch")

    pairs = sorted({(r["rule"], k) for r in rows for k in r["weight_angle_deg"]},
                   key=lambda p: (rules.index(p[0]), p[1]))
    if pairs:
        wfig = Figure(figsize=(7.0, 3.6), layout="constrained")
        ax = wfig.subplots()
        styles = ("-", "--", ":", "-.")
        for spec, k in pairs:
            pts = sorted({(r["step"], r["weight_angle_deg"][k]) for r in rows
                          if r["rule"] == spec and r["weight_angle_deg"].get(k) is not None})
            if pts:
                style = styles[[p for p in pairs if p[0] == spec].index((spec, k)) % len(styles)]
                ax.plot(*zip(*pts), color=color[spec], linestyle=style, marker="o", markersize=2.0,
                        linewidth=1.2, label=f"{spec} {k}")
        ax.set_xlabel("training step")
        ax.set_ylabel("angle between B and its reference (deg)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        wfig.legend(loc="outside right upper", fontsize="small")
        figures["alignment-weights"] = wfig
    return figures
