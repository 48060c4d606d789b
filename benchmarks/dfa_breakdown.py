"""Where a DFA step's time goes, beside BP's, inside a training loop (CPU).

    PYTHONPATH=src python benchmarks/dfa_breakdown.py [--model mlp|conv3] [--steps 300]

Times each phase of ``DirectRule.step`` (forward with cuts, ``output_error``, signals, the one
backward) and of BP's step (forward, loss, backward), alternating the two rules step by step
with Adam between steps, as ``step_time.py`` does. Prints median milliseconds per phase.
"""

from __future__ import annotations

import statistics
import time

import click
import torch
from step_time import MODELS, steady_malloc

import creditflow as cf
from creditflow.mechanisms import inject, run_cut


@click.command()
@click.option("--model", "model_key", type=click.Choice(list(MODELS)), default="mlp", show_default=True)
@click.option("--steps", type=click.IntRange(min=10), default=300, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
def main(model_key, steps, batch):
    steady_malloc()
    spec, shape = MODELS[model_key]
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    rules = {}
    for name in ("bp", "dfa"):
        torch.manual_seed(0)
        rule = cf.rules.build(name, cf.models.build(spec, input_shape=shape), num_classes=10)
        rules[name] = (rule, torch.optim.Adam(rule.trainable_parameters(), lr=1e-4))
    times: dict[str, list[float]] = {}

    def lap(key, t0):
        t1 = time.perf_counter()
        times.setdefault(key, []).append((t1 - t0) * 1e3)
        return t1

    for i in range(steps):
        bp, opt = rules["bp"]
        t = time.perf_counter()
        logits = bp.model(x)
        t = lap("bp: forward", t)
        loss = bp.loss.value(logits, y)
        t = lap("bp: loss", t)
        loss.backward()
        lap("bp: backward", t)
        opt.step()
        opt.zero_grad()

        dfa, opt = rules["dfa"]
        t = time.perf_counter()
        outputs = run_cut(dfa._hidden, x)
        logits = dfa._top(outputs[-1].detach())
        t = lap("dfa: forward (cut)", t)
        _, e = dfa.loss.error(logits, y)
        t = lap("dfa: output_error", t)
        with torch.no_grad():
            signals = dfa.signals(e, y, outputs, range(len(outputs)))
        t = lap("dfa: signals B_i e", t)
        inject([logits, *outputs], [e, *signals])
        lap("dfa: backward (one call)", t)
        opt.step()
        opt.zero_grad()

    skip = steps // 10  # warm-up
    for key, values in times.items():
        click.echo(f"{key:28s} {statistics.median(values[skip:]):7.3f} ms")
    for name in ("bp", "dfa"):
        total = sum(statistics.median(v[skip:]) for k, v in times.items() if k.startswith(name))
        click.echo(f"{name + ': sum':28s} {total:7.3f} ms")


if __name__ == "__main__":
    main()
