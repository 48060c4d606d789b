"""The tiny causal Transformer of tests/rules/test_any_output.py trained by BP, DFA and Shallow side
by side on the test's text; mean loss per block of 20 steps (docs/own-loop.md's table).

    PYTHONPATH=src:. python benchmarks/tiny_lm.py [--steps 200]
"""

from __future__ import annotations

import argparse
import math

import torch
from tests.rules.test_any_output import lm_loss, text_batches, tiny_lm

import creditflow as cf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    vocab, batches = text_batches()
    rules = {name: cf.rules.build(name, tiny_lm(vocab), num_classes=vocab) for name in ("bp", "dfa", "shallow")}
    opts = {name: torch.optim.Adam(rule.parameters(), lr=3e-3) for name, rule in rules.items()}
    history: dict[str, list[float]] = {name: [] for name in rules}
    for ids, nxt in batches[:args.steps]:
        for name, rule in rules.items():
            loss = lm_loss(rule(ids), nxt)
            rule.backward(loss)
            opts[name].step()
            opts[name].zero_grad()
            history[name].append(loss.item())
    print(f"vocabulary {vocab}, chance ln {vocab} = {math.log(vocab):.3f}")
    for name, h in history.items():
        means = [sum(h[i:i + 20]) / 20 for i in range(0, len(h) - 19, 40)]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
