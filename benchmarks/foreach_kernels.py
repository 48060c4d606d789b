"""Per-layer loops against one multi-tensor (``torch._foreach_*``) kernel, for the small per-step
updates of KP's decay (``grad += lambda p`` on W and B) and activation sharing's ``B <- W``.

    PYTHONPATH=src python benchmarks/foreach_kernels.py [--model resnet18] [--device cpu]

Interleaved: the loop and the foreach versions alternate, ``--repeats`` times each; medians printed.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

import creditflow as cf
from creditflow.mechanisms.feedback import kp_decay_


def loop_decay(layers, decay):
    for layer in layers:
        for p in (layer.weight, layer.feedback):
            if p.grad is not None:
                p.grad.add_(p, alpha=decay)


def loop_copy(layers):
    for layer in layers:
        layer.feedback.copy_(layer.weight)


def foreach_copy(layers):
    torch._foreach_copy_([layer.feedback for layer in layers], [layer.weight for layer in layers])


@click.command()
@click.option("--model", default="resnet18", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--repeats", default=200, show_default=True)
def main(model, device, repeats):
    rule = cf.rules.build("kp", cf.models.build(model), 10).to(device)
    for layer in rule.layers:
        layer.weight.grad = torch.zeros_like(layer.weight)
        layer.feedback.grad = torch.zeros_like(layer.feedback)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    cases = {"kp decay, loop": lambda: loop_decay(rule.layers, 1e-4),
             "kp decay, foreach": lambda: kp_decay_(rule.layers, 1e-4),
             "B <- W, loop": lambda: loop_copy(rule.layers),
             "B <- W, foreach": lambda: foreach_copy(rule.layers)}
    times = {k: [] for k in cases}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in cases.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    print(f"{model}, {len(rule.layers)} feedback layers, {device}, {torch.get_num_threads()} threads, median of {repeats}:")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t) * 1e3:.3f} ms |")


if __name__ == "__main__":
    main()
