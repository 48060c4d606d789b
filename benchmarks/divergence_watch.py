"""What watching for divergence costs per step: the main job's training step with and without it.

    PYTHONPATH=src python benchmarks/divergence_watch.py [--rules bp,dfa] [--rounds 20] [--steps 50]

The trainer records, on the device, the first step whose loss is NaN/Inf or beyond
``divergence_factor`` times the first step's (``DivergenceWatch.observe``: a few scalar kernels, no
host sync) and looks at it every ``DIVERGENCE_CHECK_EVERY`` steps (one sync). This times the main
job's step (``mlp:784-1024-1024-10``, batch 64, Adam, embedded data) both ways, interleaved: each
round runs ``--steps`` steps without the watch and ``--steps`` with it, in alternating order, on the
same rule, optimizer and batch; the median over rounds of ms/step is printed per rule.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

import creditflow as cf
from creditflow.train.trainer import DIVERGENCE_CHECK_EVERY, DivergenceWatch


def timed(rule, opt, x, y, steps: int, watch: DivergenceWatch | None) -> float:
    loss_sum = torch.zeros(())
    start = time.perf_counter()
    for i in range(steps):
        out = rule.step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += out.loss * len(y)  # what the trainer does every step anyway
        if watch is not None:
            watch.observe(i, out.loss)
            if (i + 1) % DIVERGENCE_CHECK_EVERY == 0:
                watch.check()
    float(loss_sum)  # the epoch-end sync both ways
    return (time.perf_counter() - start) / steps * 1000


@click.command()
@click.option("--rules", default="bp,dfa", show_default=True)
@click.option("--rounds", default=20, show_default=True)
@click.option("--steps", default=50, show_default=True)
def main(rules: str, rounds: int, steps: int) -> None:
    splits = cf.data.load("fashion-mnist-mini")
    x, y = splits.normalize(splits.train.images[:64]), splits.train.labels[:64]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms/step, median of {rounds} rounds "
          f"of {steps} steps\n\n| rule | without | with watch | cost |\n|---|---|---|---|")
    for name in rules.split(","):
        torch.manual_seed(0)
        rule = cf.rules.build(name, cf.models.build("mlp:784-1024-1024-10"), 10)
        opt = torch.optim.Adam(rule.parameters(), lr=1e-4, fused=True)
        timed(rule, opt, x, y, steps, None)  # warm-up
        plain, watched = [], []
        for r in range(rounds):
            order = [(plain, None), (watched, DivergenceWatch(1e4, torch.device("cpu")))]
            for times, watch in (order if r % 2 == 0 else order[::-1]):
                times.append(timed(rule, opt, x, y, steps, watch))
        a, b = statistics.median(plain), statistics.median(watched)
        print(f"| {name} | {a:.3f} | {b:.3f} | {b - a:+.3f} ms ({(b - a) / a:+.1%}) |")
    # the watch alone, without a training step around it: less exposed to a busy machine than the difference
    watch, loss = DivergenceWatch(1e4, torch.device("cpu")), torch.tensor(2.3)
    calls = 20000
    start = time.perf_counter()
    for i in range(calls):
        watch.observe(i, loss)
    print(f"\nobserve() alone: {(time.perf_counter() - start) / calls * 1e6:.1f} us per step")


if __name__ == "__main__":
    main()
