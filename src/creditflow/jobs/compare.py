"""Compare rules on the same model, data and seeds: accuracy mean ± std, cost relative to BP."""

from __future__ import annotations

import statistics
from typing import Any

from ..report import csv_text, fmt, markdown_table, mean_std, plot_curves
from ..train.checkpoint import write_json, write_text
from ..train.config import CompareConfig, dump_yaml
from ..train.metrics import read_jsonl
from ..train.preemption import stop_signals
from ..train.runfolder import claim
from ..train.trainer import train
from .lanes import run_all


def compare(cfg: CompareConfig, *, resume: bool = False, progress: bool = True,
            overwrite: bool = False, restart: bool = False) -> list[dict[str, Any]]:
    """Train every rule for every seed; write results.{md,csv,json} and return the table rows.

    Finished runs are read back, not trained again, and cut ones continue (``resume`` asks for it
    explicitly); ``restart`` trains every run again.
    """
    cfg = cfg.model_copy(update={"out": str(cfg.out_dir())})
    out = cfg.out_dir()
    with claim(out, cfg, resume=resume, overwrite=overwrite), stop_signals():  # a signal between runs too
        write_text(out / "config.yaml", dump_yaml(cfg))
        runs: dict[str, list[dict[str, Any]]] = {r: [] for r in cfg.rules}
        # rules inner: a slow machine drifts across all rules alike
        plan = [(rule, seed) for seed in range(cfg.seed, cfg.seed + cfg.seeds) for rule in cfg.rules]
        if cfg.jobs > 1:
            if restart or overwrite:
                raise ValueError("--jobs N resumes or reads back each run; --restart and --overwrite need --jobs 1")
            order = [("compare", rule, cfg.run(rule, seed)) for rule, seed in plan]
            done = {(rule, c.seed): summary for (_, rule, c), summary in run_all(order, cfg.jobs, progress)}
            for rule, seed in plan:
                runs[rule].append(done[rule, seed])
        else:
            for rule, seed in plan:
                runs[rule].append(train(cfg.run(rule, seed), resume=resume, progress=progress, overwrite=overwrite,
                                        restart=restart))
        rows = table_rows(runs)
        write_json(out / "results.json", {"config": cfg.model_dump(mode="json"), "rows": rows, "runs": runs})
        write_text(out / "results.csv", to_csv(rows))
        write_text(out / "results.md", to_markdown(rows, cfg))
        plot_curves({rule: [read_jsonl(cfg.run(rule, s).out_dir() / "metrics.jsonl")
                            for s in range(cfg.seed, cfg.seed + cfg.seeds)] for rule in cfg.rules},
                    out / "curves.png", f"{cfg.model} on {cfg.dataset}")
    return rows


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


def table_rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per rule; every "vs BP" column divides a quantity by the same quantity of BP's runs.

    Two memory measures are kept apart: ``saved_vs_bp`` (activation bytes autograd saved for
    backward, measured on every device where the whole rule steps in one process) and
    ``peak_vs_bp`` (the CUDA allocator's peak, where there is one). A rule that has one and not the
    other gets None there, never the other measure in its place.
    """
    base = runs.get("bp")
    base_time = statistics.fmean(s["seconds_per_step"] for s in base) if base else None
    base_saved = base[0].get("saved_for_backward_bytes") if base else None
    base_peak = base[0].get("peak_memory_bytes") if base else None
    rows = []
    for rule, summaries in runs.items():
        test_mean, test_std = mean_std([s["test_acc"] for s in summaries])
        vals = [s["val_acc"] for s in summaries if s["val_acc"] is not None]
        step = statistics.fmean(s["seconds_per_step"] for s in summaries)
        rows.append({
            "rule": rule, "seeds": len(summaries),
            "test_acc_mean": test_mean, "test_acc_std": test_std,
            "val_acc_mean": statistics.fmean(vals) if vals else None,
            "ms_per_step": 1000 * step,
            "step_time_vs_bp": ratio(step, base_time),
            "saved_vs_bp": ratio(summaries[0].get("saved_for_backward_bytes"), base_saved),
            "peak_vs_bp": ratio(summaries[0].get("peak_memory_bytes"), base_peak),
        })
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    return csv_text(list(rows[0]), (r.values() for r in rows))


def to_markdown(rows: list[dict[str, Any]], cfg: CompareConfig) -> str:
    peaks = any(r["peak_vs_bp"] is not None for r in rows)  # a CUDA run: the allocator's peak too
    lines = [
        f"Model `{cfg.model}` on `{cfg.dataset}`, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr}, seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}. "
        "Test accuracy at the best validation epoch; saved: activation bytes autograd saved for backward"
        + ("; peak: the CUDA allocator's peak in an epoch." if peaks else "."),
        "",
        *markdown_table(
            ["rule", "test acc (mean ± std)", "val acc", "ms/step", "step time vs BP", "saved vs BP",
             *(["peak vs BP"] if peaks else [])],
            ([r["rule"], f"{r['test_acc_mean']:.4f} ± {r['test_acc_std']:.4f}", fmt(r["val_acc_mean"], ".4f"),
              f"{r['ms_per_step']:.2f}", fmt(r["step_time_vs_bp"], ".2f", suffix="x"),
              fmt(r["saved_vs_bp"], ".2f", suffix="x"),
              *([fmt(r["peak_vs_bp"], ".2f", suffix="x")] if peaks else [])] for r in rows)),
    ]
    return "\n".join(lines) + "\n"
