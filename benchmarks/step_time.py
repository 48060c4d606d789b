"""Step time and activation memory of each rule against BP, in one process.

    PYTHONPATH=src python benchmarks/step_time.py                    # cpu, every rule, mlp and conv3
    PYTHONPATH=src python benchmarks/step_time.py --device cuda --rules bp,dfa

For each model, every rule gets its own copy of the same seeded weights, its own Adam, and the
same random batch already in memory. After a warm-up, rules are timed round-robin (``--rounds``
rounds of ``--steps-per-round`` steps each, the starting rule rotating each round), so slow drift
of the machine (turbo, other tenants, thermal) lands on every rule alike.

A timed step is ``rule.step(x, y)`` then ``opt.step(); opt.zero_grad()``. Both parts are timed
separately within the same step: "fwd+bwd" is ``rule.step`` alone, "step" is the whole
training step. On CUDA each timestamp follows a ``synchronize``, so the parts are latencies
(no CPU/GPU overlap across the boundary).

Memory is :func:`creditflow.diagnostics.saved_tensor_bytes` of one ``rule.step`` with the
rule's parameters and buffers excluded: the activations held for the backward pass.

By default (``--malloc steady``) glibc is told to keep freed memory for reuse, which removes a
run-to-run bias from page faults; ``--malloc default`` measures the allocator as it comes.

Results: a markdown table on stdout, and ``step_time_<device>[_<optimizer>][_default-malloc]``
``.{json,md}`` under ``--out`` (suffixes only for non-default choices).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import torch

import creditflow as cf
from creditflow.diagnostics import peak_memory

#: benchmark name -> (model spec, per-sample input shape); batch and classes come from options
MODELS = {
    "mlp": ("mlp:784-1024-1024-10", (1, 28, 28)),  # the MLP flattens (N, 1, 28, 28)
    "conv3": ("conv3", (3, 32, 32)),
    "resnet18": ("resnet18", (3, 32, 32)),  # block-wise direct feedback for direct rules
}
OPTIMIZERS = {
    # PyTorch's default implementation: foreach on CUDA, a loop over tensors on CPU
    "adam": lambda params: torch.optim.Adam(params, lr=1e-4),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=1e-4, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-3),
}


@dataclass
class Result:
    model: str
    rule: str
    params_trained: int
    step_ms: float  # median over timed steps
    fwd_bwd_ms: float
    opt_ms: float
    step_iqr_ms: float
    fwd_bwd_iqr_ms: float
    saved_bytes: int  # activations saved for backward, parameters/buffers excluded
    device_peak_bytes: int | None
    step_samples_ms: list[float] = field(repr=False)
    fwd_bwd_samples_ms: list[float] = field(repr=False)
    # filled against BP once all rules are measured
    step_vs_bp: float | None = None
    fwd_bwd_vs_bp: float | None = None
    saved_vs_bp: float | None = None


def steady_malloc() -> bool:
    """Keep freed memory in glibc's heap: no fresh ``mmap`` per large tensor, no trim to the OS.

    By default glibc serves large allocations with fresh ``mmap``s, returns freed heap tops to the
    OS and moves both thresholds as the process runs, so a step page-faults on a varying share of
    its new tensors (gradients after ``zero_grad()``, the CPU Adam's temporaries). On the MLP that
    showed up as a +-10% bias between rules that changed from run to run. PyTorch's performance
    tuning guide recommends a caching allocator (jemalloc, tcmalloc) for the same reason.
    Returns False where ``mallopt`` is missing (not glibc).
    """
    # the same thresholds for processes this one spawns (the pipeline benchmark's workers)
    os.environ.update(MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 30))
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def median_iqr(samples: list[float]) -> tuple[float, float]:
    q1, q2, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return statistics.median(samples), q3 - q1


def machine_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        # other work on the machine shows up as noise; interleaving spreads it, this records it
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def timed_step(rule, opt, x, y, sync) -> tuple[float, float]:
    """One training step; returns (``rule.step`` seconds, whole step seconds), ``sync`` around each."""
    sync()
    t0 = time.perf_counter()
    rule.step(x, y)
    sync()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    sync()
    return t1 - t0, time.perf_counter() - t0


def bench_model(model_key: str, rule_names: list[str], *, device, batch, classes, warmup, rounds,
                steps_per_round, optimizer, seed) -> list[Result]:
    spec, shape = MODELS[model_key]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    runs = {}
    for name in rule_names:
        torch.manual_seed(seed)  # every rule starts from the same weights
        model = cf.models.build(spec, input_shape=shape, num_classes=classes).to(device)
        rule = cf.rules.build_spec(name, model, num_classes=classes)
        runs[name] = (rule, OPTIMIZERS[optimizer](list(rule.trainable_parameters())))

    def one_step(rule, opt) -> tuple[float, float]:
        return timed_step(rule, opt, x, y, sync)

    for rule, opt in runs.values():
        for _ in range(warmup):
            one_step(rule, opt)

    fb = {name: [] for name in rule_names}
    step = {name: [] for name in rule_names}
    for r in range(rounds):
        k = r % len(rule_names)
        for name in rule_names[k:] + rule_names[:k]:  # rotate who goes first
            for _ in range(steps_per_round):
                t_fb, t_step = one_step(*runs[name])
                fb[name].append(t_fb * 1e3)
                step[name].append(t_step * 1e3)

    results = []
    for name, (rule, opt) in runs.items():
        mem = peak_memory(lambda: rule.step(x, y), device, exclude=rule)
        opt.zero_grad()
        step_med, step_iqr = median_iqr(step[name])
        fb_med, fb_iqr = median_iqr(fb[name])
        opt_med, _ = median_iqr([s - f for s, f in zip(step[name], fb[name])])
        results.append(Result(
            model=spec, rule=name, params_trained=sum(p.numel() for p in rule.trainable_parameters()),
            step_ms=step_med, fwd_bwd_ms=fb_med, opt_ms=opt_med, step_iqr_ms=step_iqr,
            fwd_bwd_iqr_ms=fb_iqr, saved_bytes=mem.saved_for_backward_bytes,
            device_peak_bytes=mem.device_peak_bytes, step_samples_ms=step[name],
            fwd_bwd_samples_ms=fb[name]))
    bp = next((r for r in results if r.rule == "bp"), None)
    if bp is not None:
        for r in results:
            r.step_vs_bp = r.step_ms / bp.step_ms
            r.fwd_bwd_vs_bp = r.fwd_bwd_ms / bp.fwd_bwd_ms
            r.saved_vs_bp = r.saved_bytes / bp.saved_bytes if bp.saved_bytes else None
    return results


def markdown(results: list[Result], cuda: bool) -> str:
    def ratio(v):
        return "n/a" if v is None else f"{v:.2f}x"

    head = ["model", "rule", "params trained", "step ms", "step / BP", "fwd+bwd ms",
            "fwd+bwd / BP", "optimizer ms", "saved activations MiB", "saved / BP"]
    if cuda:
        head.append("CUDA peak MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [f"`{r.model}`", r.rule, f"{r.params_trained:,}", f"{r.step_ms:.2f}", ratio(r.step_vs_bp),
               f"{r.fwd_bwd_ms:.2f}", ratio(r.fwd_bwd_vs_bp), f"{r.opt_ms:.2f}",
               f"{r.saved_bytes / 2**20:.2f}", ratio(r.saved_vs_bp)]
        if cuda:
            row.append("n/a" if r.device_peak_bytes is None else f"{r.device_peak_bytes / 2**20:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so readers never see half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.chmod(f.name, 0o644)  # mkstemp makes it 0600
    os.replace(f.name, path)


def parse_rules(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("give at least one rule, e.g. bp,dfa")
    for name in names:
        try:
            cf.rules.parse_spec(name)  # "asap:k=4:saved_norm=bfloat16" carries options
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
    if len(set(names)) != len(names):
        raise click.BadParameter(f"rule listed twice in {text!r}")
    return names


@click.command()
@click.option("--rules", "rules_text", default="bp,shallow,fa,dfa,drtp,las,ltas", show_default=True,
              help="comma-separated rules, options after colons (asap:k=4); BP must be among them for the ratios")
@click.option("--models", "model_keys", default="mlp,conv3", show_default=True,
              help=f"comma-separated, from: {', '.join(MODELS)}")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch.set_num_threads; default: leave PyTorch's choice")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="untimed steps per rule before timing")
@click.option("--rounds", type=click.IntRange(min=1), default=100, show_default=True,
              help="round-robin rounds; in each, every rule runs --steps-per-round timed steps")
@click.option("--steps-per-round", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adam", show_default=True,
              help="adam: PyTorch's default (foreach on CUDA, a per-tensor loop on CPU); "
                   "adam-fused: one kernel")
@click.option("--malloc", type=click.Choice(["steady", "default"]), default="steady", show_default=True,
              help="steady: glibc keeps freed memory for reuse (see steady_malloc); default: leave it")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path(__file__).resolve().parent / "results", show_default="benchmarks/results/")
def main(rules_text, model_keys, device, threads, batch, classes, warmup, rounds, steps_per_round,
         optimizer, malloc, seed, out):
    """Median step time, fwd+bwd time and saved activations of each rule, with ratios to BP."""
    rule_names = parse_rules(rules_text)
    keys = [k.strip() for k in model_keys.split(",") if k.strip()]
    for k in keys:
        if k not in MODELS:
            raise click.BadParameter(f"unknown model {k!r}; available: {', '.join(MODELS)}",
                                     param_hint="--models")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available here; use --device cpu", param_hint="--device")
    if classes != 10 and "mlp" in keys:
        raise click.BadParameter("the mlp benchmark model has 10 outputs; use --classes 10",
                                 param_hint="--classes")
    if threads is not None:
        torch.set_num_threads(threads)
    malloc_used = "steady" if malloc == "steady" and steady_malloc() else "default"
    dev = torch.device(device)

    t_start = time.perf_counter()
    results = []
    for k in keys:
        results += bench_model(k, rule_names, device=dev, batch=batch, classes=classes, warmup=warmup,
                               rounds=rounds, steps_per_round=steps_per_round, optimizer=optimizer,
                               seed=seed)
    settings = {"rules": rule_names, "models": keys, "batch": batch, "classes": classes,
                "warmup": warmup, "rounds": rounds, "steps_per_round": steps_per_round,
                "optimizer": optimizer, "malloc": malloc_used, "seed": seed, "threads_option": threads,
                "command": " ".join(["python", "benchmarks/step_time.py", *sys.argv[1:]]),
                "wall_s": round(time.perf_counter() - t_start, 1)}
    machine = machine_info(dev)
    table = markdown(results, dev.type == "cuda")
    click.echo(table)

    out.mkdir(parents=True, exist_ok=True)
    stem = "_".join(["step_time", dev.type] + [optimizer] * (optimizer != "adam")
                    + ["default-malloc"] * (malloc_used != "steady"))
    write_results(out / stem, f"Step time ({dev.type})", machine, settings, results, table)


def write_results(path: Path, title: str, machine: dict, settings: dict, results: list, table: str) -> None:
    """``path``.json (machine, settings, per-rule results) and ``path``.md (the same as a header + table)."""
    payload = {"machine": machine, "settings": settings, "results": [asdict(r) for r in results]}
    write_atomic(Path(f"{path}.json"), json.dumps(payload, indent=2) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in {**machine, **settings}.items())
    write_atomic(Path(f"{path}.md"), f"# {title}\n\n{header}\n\n{table}")
    click.echo(f"wrote {path}.json and .md ({settings['wall_s']} s)", err=True)


if __name__ == "__main__":
    main()
