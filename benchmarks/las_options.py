"""Measured effect of the LAS/LTAS options that follow the paper's algorithm boxes (docs/rules.md).

Each variant trains through the ordinary trainer on the same seeds, data and batches; prints a
markdown table of test accuracy at the best validation epoch (mean ± std over seeds).
Usage: ``python benchmarks/las_options.py [--epochs 5] [--seeds 2] [--out runs/las-options]``.
"""

from __future__ import annotations

import statistics

import click

from creditflow.report import markdown_table
from creditflow.train import NonFiniteLoss, RunConfig, train

VARIANTS = {  # name: (model, rule, rule options)
    "las (default)": ("mlp:784-256-256-10", "las", {}),
    "las local_scale=1 (eq. 20)": ("mlp:784-256-256-10", "las", {"local_scale": 1.0}),
    "las update_first (Alg. 1 l. 13-14)": ("mlp:784-256-256-10", "las", {"update_first": True, "local_lr": 0.001}),
    "ltas": ("mlp:784-256-256-10", "ltas", {}),
    "ltas update_first (Alg. 2 l. 5)": ("mlp:784-256-256-10", "ltas", {"update_first": True, "local_lr": 0.001}),
    "las conv3 local_pool=avg": ("conv3", "las", {"local_pool": "avg"}),
    "las conv3 local_pool=max": ("conv3", "las", {"local_pool": "max"}),
}


@click.command()
@click.option("--epochs", default=5, show_default=True)
@click.option("--seeds", default=2, show_default=True)
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam"]))
@click.option("--lr", default=0.01, show_default=True)
@click.option("--local-lr", default=0.001, show_default=True,
              help="the modules' rate (their own SGD step with update_first); larger diverges under SGD")
@click.option("--out", default="runs/las-options", show_default=True)
def main(epochs, seeds, optimizer, lr, local_lr, out):
    rows = []
    for name, (model, rule, options) in VARIANTS.items():
        accs = []
        for seed in range(seeds):
            cfg = RunConfig(rule=rule, model=model, dataset="fashion-mnist-mini", epochs=epochs, optimizer=optimizer,
                            lr=lr, local_lr=local_lr, momentum=0.9, seed=seed, device="cpu",
                            rule_options={**options, **({"local_lr": local_lr} if "local_lr" in options else {})},
                            out=f"{out}/{name.split(' (')[0].replace(' ', '_').replace('=', '-')}/seed{seed}")
            try:
                accs.append(train(cfg, resume=True, progress=False)["test_acc"])
            except NonFiniteLoss:
                accs.append(None)  # diverged
        done = [a for a in accs if a is not None]
        sd = statistics.stdev(done) if len(done) > 1 else 0.0
        cell = f"{statistics.fmean(done):.4f} ± {sd:.4f}" if done else "diverged"
        rows.append([name, model, cell + (f" ({len(accs) - len(done)} diverged)" if done and len(done) < len(accs) else "")])
    print(f"fashion-mnist-mini, {epochs} epochs, {optimizer} lr {lr} (modules {local_lr}), seeds 0..{seeds - 1}\n")
    print("\n".join(markdown_table(["variant", "model", "test acc"], rows)))


if __name__ == "__main__":
    main()
