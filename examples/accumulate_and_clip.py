"""A rule in a plain PyTorch loop of your own: label smoothing, gradient accumulation, clipping.

    python examples/accumulate_and_clip.py --rule dfa

The rule is used like autograd: ``out = rule(x)``, any loss, ``rule.backward(loss, scale=...)``.
``scale`` is the factor the loss carries beyond its plain value (here ``1/accumulate``), so what a
rule adds from its own objectives (LAS's modules, local classifiers, KP's decay...) accumulates
as the micro-batches' losses do. Everything else is ordinary PyTorch.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

import creditflow as cf


def train(rule_name: str = "dfa", epochs: int = 2, batch_size: int = 32, accumulate: int = 4, clip: float = 1.0,
          lr: float = 1e-3, seed: int = 0) -> float:
    """Train ``mlp:784-256-256-10`` on the embedded Fashion-MNIST subset; return the test accuracy."""
    torch.manual_seed(seed)
    splits = cf.data.load("fashion-mnist-mini")
    rule = cf.rules.build(rule_name, cf.models.build("mlp:784-256-256-10"), num_classes=splits.num_classes)
    opt = torch.optim.Adam(rule.param_groups(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    rule.train()
    for _ in range(epochs):
        for i, (x, y) in enumerate(cf.data.batches(splits.train, batch_size, shuffle=True, generator=g)):
            out = rule(splits.normalize(x), y if rule.needs_target else None)  # y: DRTP, LTAS, local, AL
            loss = F.cross_entropy(out, y, label_smoothing=0.1)
            rule.backward(loss / accumulate, scale=1 / accumulate)  # .grad accumulates, as autograd's
            if (i + 1) % accumulate == 0:
                torch.nn.utils.clip_grad_norm_(rule.parameters(), clip)
                opt.step()
                opt.zero_grad()
    rule.eval()
    with torch.no_grad():
        logits = rule(splits.normalize(splits.test.images))  # outside training: the plain network
    return (logits.argmax(-1) == splits.test.labels).float().mean().item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="dfa", choices=cf.rules.available())
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.rule}: test accuracy {train(args.rule, args.epochs):.4f}")
