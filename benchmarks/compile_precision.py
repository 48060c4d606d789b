"""Step time of each rule eager, compiled (inductor) and under bf16 autocast, in one process.

    PYTHONPATH=src python benchmarks/compile_precision.py                       # cpu, bp fa dfa las asap
    PYTHONPATH=src python benchmarks/compile_precision.py --device cuda --model conv3

Every (rule, mode) pair gets its own copy of the same seeded weights, its own Adam and the same
batch in memory. Compiled rules are warmed up (the compile happens there) before timing; then the
pairs are timed round-robin (``--rounds`` rounds of ``--steps`` steps, the first pair rotating), so
drift of the machine lands on all alike. A timed step is ``rule.step(x, y)`` (under autocast for
bf16), ``opt.step()``, ``opt.zero_grad()``; on CUDA each timestamp follows a synchronize.

Results: a markdown table on stdout and ``compile_precision_<device>_<model>.{json,md}`` in ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import click
import torch

import creditflow as cf

MODELS = {"mlp": ("mlp:784-1024-1024-10", (1, 28, 28)), "conv3": ("conv3", (3, 32, 32))}
MODES = ("eager", "compiled", "bf16")


def build(rule_name: str, model_key: str, mode: str, device: torch.device, classes: int):
    spec, shape = MODELS[model_key]
    torch.manual_seed(0)
    model = cf.models.build(spec, input_shape=shape, num_classes=classes)
    rule = cf.rules.build_spec(rule_name, model, classes).to(device)
    if mode == "compiled":
        rule.compile()  # inductor
    autocast = torch.autocast(device.type, torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
    return rule, torch.optim.Adam(rule.param_groups(), lr=1e-4), autocast


@click.command()
@click.option("--rules", default="bp,fa,dfa,las,asap", show_default=True)
@click.option("--model", "model_key", type=click.Choice(list(MODELS)), default="mlp", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--rounds", default=10, show_default=True)
@click.option("--steps", default=5, show_default=True, help="timed steps per pair per round")
@click.option("--threads", default=None, type=int, help="torch threads (default: torch's)")
@click.option("--out", default="benchmarks/results", show_default=True)
def main(rules, model_key, device, batch, warmup, rounds, steps, threads, out):
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    classes = 10
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *MODELS[model_key][1], generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    pairs = {(r, m): build(r, model_key, m, device, classes) for r in rules.split(",") for m in MODES}
    compile_s = {}

    def one_step(key):
        rule, opt, autocast = pairs[key]
        sync()
        start = time.perf_counter()
        with autocast:
            rule.step(x, y)
        opt.step()
        opt.zero_grad()
        sync()
        return time.perf_counter() - start

    for key in pairs:
        start = time.perf_counter()
        for _ in range(warmup):
            one_step(key)
        compile_s[key] = time.perf_counter() - start
    times: dict[tuple[str, str], list[float]] = {k: [] for k in pairs}
    keys = list(pairs)
    for r in range(rounds):
        k = r % len(keys)
        for key in keys[k:] + keys[:k]:
            times[key].extend(one_step(key) for _ in range(steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"| rule | eager ms | compiled ms | compiled / eager | bf16 ms | bf16 / eager | first {warmup} compiled steps s |",
             "|---|---|---|---|---|---|---|"]
    for r in rules.split(","):
        e, c, b = med[r, "eager"], med[r, "compiled"], med[r, "bf16"]
        lines.append(f"| {r} | {e * 1e3:.2f} | {c * 1e3:.2f} | {c / e:.2f}x | {b * 1e3:.2f} | {b / e:.2f}x | "
                     f"{compile_s[r, 'compiled']:.1f} |")
    table = "\n".join(lines)
    info = {"model": MODELS[model_key][0], "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "rounds": rounds, "steps": steps,
            "date": time.strftime("%Y-%m-%d")}
    print(table)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"compile_precision_{device.type}_{model_key}"
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "median_s": {f"{r}/{m}": v for (r, m), v in med.items()},
                                                     "warmup_s": {f"{r}/{m}": v for (r, m), v in compile_s.items()}},
                                                    indent=2))
    stem.with_suffix(".md").write_text(f"{json.dumps(info)}\n\n{table}\n")


if __name__ == "__main__":
    main()
