"""``creditflow analyze RUN_DIR``: Associated Learning's analyses of the layers, on any finished run.

The run is rebuilt exactly as ``train`` built it (``build_run``) and its trained weights loaded
from ``checkpoint.pt``. On a class-balanced sample of the test split, every layer's features
(``rule.representations``, plus the normalised input as ``input``) give:

* class distances and their ratio (AL paper Table 7; definitions in
  :mod:`creditflow.diagnostics.representations`);
* t-SNE figures, one colour per class (AL paper Figs. 5-6), on a smaller class-balanced part;
* curves of every metric family ``name/<i>`` in ``metrics.jsonl`` over the epochs (e.g. AL's
  ``assoc_loss/<i>``: the associated loss per component, Table 5), with last-epoch values.

Writes, all atomically, into ``RUN_DIR/analysis/``: ``analysis.json``, ``distances.csv``,
``tsne.csv`` (the t-SNE points), ``tsne.png`` (every layer) and ``tsne-<layer>.png``, and
``<family>.png`` per metric family. Several runs side by side (``runs_markdown``) give the shape of
Tables 5 and 6: last-epoch loss per layer and accuracy against the number of layers.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from .. import data
from ..devices import DeviceName, resolve_device
from ..diagnostics.representations import (
    balanced_subset,
    class_statistics,
    plot_tsne,
    require_sklearn,
    tsne_embedding,
)
from ..report import (
    csv_text,
    figure_class,
    finite,
    fmt,
    markdown_row,
    markdown_table,
    save_figure,
)
from ..train.checkpoint import load_checkpoint, write_json, write_text
from ..train.config import ConfigError, RunConfig, validate
from ..train.metrics import read_jsonl
from ..train.trainer import build_run

log = logging.getLogger(__name__)

FAMILY = re.compile(r"^(?P<family>.+)/(?P<index>\d+)$")  # "assoc_loss/2" -> ("assoc_loss", 2)


class AnalyzeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(2000, ge=1, description="class-balanced samples of the split for the class distances")
    tsne: bool = Field(True, description="t-SNE of every layer (needs scikit-learn: the analysis extra)")
    tsne_samples: int = Field(500, ge=1, description="samples in each t-SNE, a class-balanced part of --samples "
                                                     "(at least one per class)")
    perplexity: float = Field(30.0, gt=0, description="t-SNE perplexity (capped at (n - 1) / 3)")
    plot: bool = Field(True, description="write the figures (needs matplotlib: the plot extra)")
    layers: str | None = Field(None, description="comma-separated layers to analyse, e.g. input,block1,head "
                                                 "(default: all)")
    split: Literal["test", "val", "train"] = Field("test", description="split the samples come from")
    seed: int = Field(0, ge=0, description="seed of the sample and of t-SNE")
    batch_size: int | None = Field(None, ge=1, description="batch size (default: the run's eval batch size)")
    device: DeviceName = Field("auto", description="device for the forward passes: auto, cpu, cuda or cuda:N")

    data_dir: str | None = Field(None, description="folder holding the dataset (default: the run's)")

    def layer_list(self) -> list[str] | None:
        return [s.strip() for s in self.layers.split(",") if s.strip()] if self.layers else None


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[RunConfig, dict[str, Any]]:
    """The config and checkpoint of a *finished* training run; a one-line error for anything else."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run} is not a training run: no config.yaml (runs come from creditflow train)")
    try:
        cfg = validate(RunConfig, yaml.safe_load((run / "config.yaml").read_text()) or {})
    except (ConfigError, yaml.YAMLError) as err:
        raise ValueError(f"{run}/config.yaml is not a training run's config: {err}") from None
    resume = f"finish it with: creditflow train --config {run}/config.yaml --out {run} --resume"
    if not (run / "checkpoint.pt").is_file():
        raise ValueError(f"{run} has no trained weights (no checkpoint.pt); {resume}")
    state = load_checkpoint(run / "checkpoint.pt", device)
    saved, current = state.get("config") or {}, cfg.model_dump(mode="json")
    if any(saved[k] != current.get(k) for k in saved):  # keys newer than the run take their defaults
        raise ValueError(f"{run}: config.yaml and checkpoint.pt describe different runs")
    if state.get("epoch", 0) < cfg.epochs or not (run / "summary.json").is_file():
        raise ValueError(f"{run} is not finished (epoch {state.get('epoch', 0)} of {cfg.epochs}); {resume}")
    return cfg, state


def metric_families(rows: list[dict[str, Any]]) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """``{family: {i: [(epoch, value), ...]}}`` for every ``family/<i>`` key in the metric rows."""
    out: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for row in rows:
        for key, value in row.items():
            m = FAMILY.match(key)
            if m and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(m["family"], {}).setdefault(int(m["index"]), []).append((row["epoch"], value))
    return {f: dict(sorted(series.items())) for f, series in sorted(out.items())}


def plot_metric_family(family: str, series: dict[int, list[tuple[int, float]]]):
    """One line per index against the epoch; log scale when every value is positive (losses)."""
    Figure = figure_class()
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.subplots()
    for i, points in series.items():
        ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1.2, label=f"{family}/{i}")
    if all(v > 0 for points in series.values() for _, v in points):
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(family)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    return fig


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "layer"


def analyze(run_dir: str | Path, opts: AnalyzeOptions | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run the analyses on a finished run; write ``RUN_DIR/analysis/`` and return what analysis.json holds."""
    opts = opts or AnalyzeOptions()
    if opts.plot:
        figure_class()  # a missing extra fails now, not after the forward passes
    if opts.tsne:
        require_sklearn()
    run = Path(run_dir)
    device = resolve_device(opts.device)
    cfg, state = load_run(run, device)
    out = run / "analysis"
    splits = data.load(cfg.dataset, data_dir=opts.data_dir or cfg.data_dir, download=cfg.download,
                       val_fraction=cfg.val_fraction, seed=cfg.seed)
    rule, _, _ = build_run(cfg, splits, device)
    rule.load_state_dict(state["rule"])
    imageset = getattr(splits, opts.split)
    if len(imageset) == 0:
        raise ValueError(f"the {opts.split} split of {cfg.dataset} is empty; choose another --split")
    idx = balanced_subset(imageset.labels, opts.samples, opts.seed)
    images, labels = imageset.images[idx], imageset.labels[idx]
    num_classes = len(torch.unique(labels))
    keep = max(1, opts.tsne_samples // num_classes) if opts.tsne else 0
    stats = class_statistics(
        rule, images, labels, keep_per_class=keep, transform=splits.normalize, device=device,
        batch_size=opts.batch_size or cfg.eval_batch_size, layers=opts.layer_list(),
        progress=lambda classes: tqdm(classes, desc=f"analyze {run.name}", leave=False, disable=not progress))

    rows = read_jsonl(run / "metrics.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    families = metric_families(rows)
    result: dict[str, Any] = {
        "run": str(run), "rule": cfg.rule, "model": cfg.model, "dataset": cfg.dataset, "epochs": cfg.epochs,
        "train_acc": rows[-1].get("train_acc") if rows else None, "test_acc": summary.get("test_acc"),
        "split": opts.split, "samples": len(labels), "classes": num_classes, "seed": opts.seed,
        "layers": [{"layer": name, "dim": stats.dims[name], "inter": finite(d.inter), "intra": finite(d.intra),
                    "ratio": finite(d.ratio), "intra_per_class": {str(k): finite(v) for k, v in
                                                                   d.intra_per_class.items()}}
                   for name, d in stats.distances.items()],
        "metric_families": {f: {"series": {str(i): [[e, v] for e, v in pts] for i, pts in s.items()},  # [epoch, value]
                                "last": {str(i): pts[-1][1] for i, pts in s.items()}}
                            for f, s in families.items()},
        "tsne": None,
    }
    write_text(out / "distances.csv", distances_csv(result))
    if opts.plot:
        for family, series in families.items():
            save_figure(plot_metric_family(family, series), out / f"{safe_name(family)}.png")
    if opts.tsne:
        result["tsne"] = run_tsne(stats, opts, out, splits.classes, num_classes)
    write_json(out / "analysis.json", result)
    return result


def run_tsne(stats, opts: AnalyzeOptions, out: Path, class_names, num_classes: int) -> dict[str, Any]:
    labels = stats.kept_labels
    panels, perplexity = [], None
    for name, z in stats.kept.items():
        log.info("t-SNE of %s: %d points, %d features", name, len(z), z.shape[1])
        points, perplexity = tsne_embedding(z, perplexity=opts.perplexity, seed=opts.seed)
        panels.append((name, points))
    write_text(out / "tsne.csv", csv_text(["layer", "label", "x", "y"], (
        [name, int(k), float(px), float(py)] for name, points in panels
        for k, (px, py) in zip(labels.tolist(), points))))
    figures = []
    if opts.plot:
        ratios = {name: d.ratio for name, d in stats.distances.items()}
        titled = [(f"{name} (inter/intra {ratios[name]:.2f})", pts) for name, pts in panels]
        for (name, _), panel in zip(panels, titled):
            figures.append(f"tsne-{safe_name(name)}.png")
            save_figure(plot_tsne([panel], labels, class_names=class_names, num_classes=num_classes),
                        out / figures[-1])
        save_figure(plot_tsne(titled, labels, class_names=class_names, num_classes=num_classes), out / "tsne.png")
        figures.append("tsne.png")
    return {"samples": len(labels), "perplexity": perplexity, "pca_dims": 50, "figures": figures}


def distances_csv(result: dict[str, Any]) -> str:
    return csv_text(["layer", "dim", "samples", "inter", "intra", "ratio"],  # None: an empty cell
                    ([r["layer"], r["dim"], result["samples"], r["inter"], r["intra"], r["ratio"]]
                     for r in result["layers"]))


def to_markdown(result: dict[str, Any]) -> str:
    """The run's class-distance table and its metric families' last-epoch values."""
    lines = [f"{result['run']}: {result['rule']} on {result['model']}, {result['dataset']}, "
             f"test acc {fmt(result['test_acc'])}", "",
             f"Class distances of each layer's features ({result['samples']} {result['split']} samples, "
             f"{result['classes']} classes; AL paper Table 7):", "",
             *markdown_table(["layer", "dim", "inter-class", "intra-class", "inter/intra"],
                             ([r["layer"], r["dim"], fmt(r["inter"]), fmt(r["intra"]), fmt(r["ratio"])]
                              for r in result["layers"]))]
    families = result["metric_families"]
    if families:
        index = sorted({int(i) for f in families.values() for i in f["last"]})  # AL counts components from 1
        lines += ["", "Last epoch of each metric family (AL paper Table 5):", "",
                  *markdown_table(["metric", *index], ([name, *(fmt(f["last"].get(str(i))) for i in index)]
                                                       for name, f in families.items()))]
    return "\n".join(lines) + "\n"


def runs_markdown(results: list[dict[str, Any]]) -> str:
    """Runs side by side (AL paper Tables 5-6): layers, accuracy, last-epoch metrics, last layer's ratio."""
    lines = ["Runs side by side (AL paper Tables 5 and 6):", "",
             *markdown_table(["", *(Path(r["run"]).name for r in results)], [])]

    def row(label, values):
        lines.append(markdown_row([label, *values]))

    row("layers (input excluded)", [str(sum(layer["layer"] != "input" for layer in r["layers"])) for r in results])
    row("train acc (last epoch)", [fmt(r["train_acc"]) for r in results])
    row("test acc", [fmt(r["test_acc"]) for r in results])
    keys = list(dict.fromkeys((f, i) for r in results for f, fam in r["metric_families"].items() for i in fam["last"]))
    for f, i in keys:
        row(f"{f}/{i}", [fmt(r["metric_families"].get(f, {}).get("last", {}).get(i)) for r in results])
    row("inter/intra, last layer", [fmt(r["layers"][-1]["ratio"]) if r["layers"] else "n/a" for r in results])
    return "\n".join(lines) + "\n"
