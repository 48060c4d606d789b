"""Step time and memory of Associated Learning (one process) against BP on the matched models.

    PYTHONPATH=src python benchmarks/associated_learning.py                       # cpu, all five pairs
    PYTHONPATH=src python benchmarks/associated_learning.py --pairs mlp,resnet20 --rounds 5
    PYTHONPATH=src python benchmarks/associated_learning.py --device cuda

Each pair is AL on an ``al-*`` network beside BP on its matched network (the AL inference path
with ReLU and a linear head: the same effective parameters, Kao & Chen 2021 Sec. 5.1). Both get
the same random batch (already in memory) and their own Adam; after a warm-up they are timed
step by step in turn, the first one alternating each round, as ``step_time.py`` does (its
helpers are reused). A step is ``rule.step(x, y)`` then ``opt.step(); opt.zero_grad()``.

Memory: ``saved_tensor_bytes`` of one ``rule.step`` with the rule's parameters and buffers left
out (activations held for the backward pass; the same on every device), and on CUDA the
allocator's peak during that step. AL also trains affiliated parameters (every g_i, and the
bridges b_1..b_{L-1}), so ``param MiB`` (trained parameters, float32) is reported beside it: with
their gradients and Adam's two moments the training state is four times that.

AL here runs its components one after another in one process (one fused backward). Its step
time is therefore *not* the pipelined time of the paper's Table 1; the largest component's
share of the work bounds what a pipeline over processes can gain (issue 7).

Results: a markdown table on stdout and ``associated_learning_<device>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_time.py beside this file
from step_time import (  # noqa: E402
    OPTIMIZERS,
    machine_info,
    median_iqr,
    steady_malloc,
    timed_step,
    write_results,
)

import creditflow as cf  # noqa: E402
from creditflow.diagnostics import peak_memory  # noqa: E402

#: pair -> (AL model, matched BP model, per-sample input shape)
PAIRS = {
    "mlp": ("al-mlp:784-1024-1024-10", "mlp:784-1024-1024-5120-1024-1024-10", (1, 28, 28)),
    "vanilla-cnn": ("al-vanilla-cnn", "vanilla-cnn", (3, 32, 32)),
    "vgg": ("al-vgg", "vgg", (3, 32, 32)),
    "resnet20": ("al-resnet20", "resnet20", (3, 32, 32)),
    "resnet32": ("al-resnet32", "resnet32", (3, 32, 32)),
}


@dataclass
class Result:
    pair: str
    rule: str
    model: str
    params_trained: int
    params_effective: int  # parameters the trained network predicts with
    step_ms: float  # median over timed steps
    fwd_bwd_ms: float
    opt_ms: float
    step_iqr_ms: float
    saved_bytes: int
    device_peak_bytes: int | None
    step_samples_ms: list[float]
    step_vs_bp: float | None = None
    fwd_bwd_vs_bp: float | None = None
    saved_vs_bp: float | None = None
    params_vs_bp: float | None = None


def effective(model) -> int:
    net = model.inference_model() if hasattr(model, "inference_model") else model
    return sum(p.numel() for p in net.parameters())


def bench_pair(pair: str, *, device, batch, warmup, rounds, optimizer, seed, al_options=None) -> list[Result]:
    al_spec, bp_spec, shape = PAIRS[pair]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    runs = {}
    for rule_name, spec in (("al", al_spec), ("bp", bp_spec)):
        torch.manual_seed(seed)
        options = (al_options or {}) if rule_name == "al" else {}
        model = cf.models.build(spec, input_shape=shape, num_classes=10, **options).to(device)
        rule = cf.rules.build(rule_name, model, num_classes=10)
        runs[rule_name] = (spec, rule, OPTIMIZERS[optimizer](list(rule.trainable_parameters())))

    def one_step(rule, opt) -> tuple[float, float]:
        return timed_step(rule, opt, x, y, sync)

    for _, rule, opt in runs.values():
        for _ in range(warmup):
            one_step(rule, opt)
    names = list(runs)
    fb = {n: [] for n in names}
    step = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % 2:] + names[:r % 2]:  # alternate who goes first
            t_fb, t_step = one_step(*runs[n][1:])
            fb[n].append(t_fb * 1e3)
            step[n].append(t_step * 1e3)

    results = []
    for n, (spec, rule, opt) in runs.items():
        mem = peak_memory(lambda: rule.step(x, y), device, exclude=rule)
        opt.zero_grad()
        step_med, step_iqr = median_iqr(step[n])
        fb_med, _ = median_iqr(fb[n])
        results.append(Result(
            pair=pair, rule=n, model=spec, params_trained=sum(p.numel() for p in rule.trainable_parameters()),
            params_effective=effective(rule.model), step_ms=step_med, fwd_bwd_ms=fb_med,
            opt_ms=median_iqr([s - f for s, f in zip(step[n], fb[n])])[0], step_iqr_ms=step_iqr,
            saved_bytes=mem.saved_for_backward_bytes, device_peak_bytes=mem.device_peak_bytes,
            step_samples_ms=step[n]))
    al, bp = results
    for r in results:
        r.step_vs_bp, r.fwd_bwd_vs_bp = r.step_ms / bp.step_ms, r.fwd_bwd_ms / bp.fwd_bwd_ms
        r.saved_vs_bp = r.saved_bytes / bp.saved_bytes if bp.saved_bytes else None
        r.params_vs_bp = r.params_trained / bp.params_trained
    del runs  # the AL VGG's training state is ~2.6 GB; free it before the next pair
    return results


def markdown(results: list[Result], cuda: bool) -> str:
    head = ["pair", "rule", "model", "params trained", "params effective", "step ms (IQR)", "step / BP",
            "fwd+bwd ms", "fwd+bwd / BP", "optimizer ms", "saved activations MiB", "saved / BP", "param MiB"]
    if cuda:
        head.append("CUDA peak MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.pair, r.rule, f"`{r.model}`", f"{r.params_trained:,}", f"{r.params_effective:,}",
               f"{r.step_ms:.1f} ({r.step_iqr_ms:.1f})", f"{r.step_vs_bp:.2f}x", f"{r.fwd_bwd_ms:.1f}",
               f"{r.fwd_bwd_vs_bp:.2f}x", f"{r.opt_ms:.1f}", f"{r.saved_bytes / 2**20:.1f}",
               "n/a" if r.saved_vs_bp is None else f"{r.saved_vs_bp:.2f}x", f"{r.params_trained * 4 / 2**20:.0f}"]
        if cuda:
            row.append("n/a" if r.device_peak_bytes is None else f"{r.device_peak_bytes / 2**20:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--pairs", "pair_text", default=",".join(PAIRS), show_default=True,
              help=f"comma-separated, from: {', '.join(PAIRS)}")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch.set_num_threads")
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="timed steps per rule, AL and BP in turn")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adam-fused", show_default=True,
              help="adam-fused: what the trainer uses on CPU and CUDA; adam: PyTorch's default loop")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--al-option", "al_option", multiple=True, metavar="KEY=VALUE",
              help="model option for the AL networks only, e.g. activation=relu (BP's encoders use ReLU)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path(__file__).resolve().parent / "results" / "associated_learning",
              show_default="benchmarks/results/associated_learning/")
def main(pair_text, device, threads, batch, warmup, rounds, optimizer, seed, al_option, out):
    """Median step time and saved activations of AL and of BP on its matched model, with ratios."""
    keys = [k.strip() for k in pair_text.split(",") if k.strip()]
    for k in keys:
        if k not in PAIRS:
            raise click.BadParameter(f"unknown pair {k!r}; available: {', '.join(PAIRS)}", param_hint="--pairs")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available here; use --device cpu", param_hint="--device")
    al_options = {}
    for item in al_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--al-option")
        al_options[key.replace("-", "_")] = yaml.safe_load(value)
    if threads is not None:
        torch.set_num_threads(threads)
    malloc = "steady" if steady_malloc() else "default"
    dev = torch.device(device)
    t_start = time.perf_counter()
    results = []
    for k in keys:
        results += bench_pair(k, device=dev, batch=batch, warmup=warmup, rounds=rounds, optimizer=optimizer,
                              seed=seed, al_options=al_options)
        click.echo(f"{k}: done ({time.perf_counter() - t_start:.0f} s)", err=True)
    settings = {"pairs": keys, "al_options": al_options, "batch": batch, "warmup": warmup, "rounds": rounds,
                "optimizer": optimizer, "malloc": malloc, "seed": seed, "threads_option": threads,
                "command": " ".join(["python", "benchmarks/associated_learning.py", *sys.argv[1:]]),
                "wall_s": round(time.perf_counter() - t_start, 1)}
    machine = machine_info(dev)
    table = markdown(results, dev.type == "cuda")
    click.echo(table)
    out.mkdir(parents=True, exist_ok=True)
    stem = "_".join([f"associated_learning_{dev.type}", *(f"{k}-{v}" for k, v in al_options.items())])
    write_results(out / stem, f"Associated Learning vs BP, step time ({dev.type})", machine, settings, results, table)


if __name__ == "__main__":
    main()
