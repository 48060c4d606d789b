"""The default epoch loop: every step of one epoch in this process, and where a cut epoch stands.

A :class:`~creditflow.train.trainer.Strategy` keeps placement and collectives (``shard``,
``after_step``, ``totals``); this loop calls them around each ``rule.step`` and the optimizer, keeps
the epoch's running sums on the device (no host sync per step), and stops at a step boundary when a
stop was requested (:mod:`creditflow.train.preemption`). What it has done so far is an
:class:`EpochProgress`, which a checkpoint holds and a resumed loop starts from. The pipeline has
its own loop (:mod:`creditflow.parallel.pipeline`): its stages step apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .trainer import EpochTotals, Strategy, Trainer


class EpochProgress(NamedTuple):
    """The part of an epoch done before a cut: ``steps`` batches and their sums (plain numbers)."""

    steps: int
    loss_sum: float
    correct: int
    seen: int
    seconds: float
    metrics: dict[str, float]  # rule.step_metrics() summed over the steps

    @classmethod
    def none(cls) -> EpochProgress:
        return cls(0, 0.0, 0, 0, 0.0, {})


class EpochLoop:
    """One epoch of ``rule.step`` + collectives + optimizer over ``batches``; see the module docstring."""

    def __init__(self, strategy: Strategy, trainer: Trainer):
        self.strategy, self.trainer = strategy, trainer
        self.progress: EpochProgress | None = None  # set when the loop stopped before the epoch's end

    def run(self, batches: Iterator, steps: int, start: EpochProgress | None = None) -> EpochTotals | None:
        """Train until ``steps`` batches are done (``start``: those a cut epoch had done already).

        Returns the epoch's totals over every process on the main one (None elsewhere), or None with
        :attr:`progress` set when a stop was requested first.
        """
        from .trainer import EpochTotals

        strategy, trainer = self.strategy, self.trainer
        rule, opt, device = trainer.rule, trainer.optimizer, trainer.device
        start = start or EpochProgress.none()
        rule.train()
        loss_sum = torch.tensor(start.loss_sum, device=device)
        correct = torch.tensor(start.correct, dtype=torch.long, device=device)
        seen, n = start.seen, start.steps
        extra: dict[str, torch.Tensor] = {k: torch.tensor(v, device=device) for k, v in start.metrics.items()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()

        def seconds() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return start.seconds + time.perf_counter() - began

        for x, y in batches:
            if n == steps:
                break
            if (part := strategy.shard(x, y)) is None:
                continue  # a last batch smaller than the number of ranks: skipped on every rank
            x, y = part
            out = trainer.step(n, x, y)
            trainer.observe_loss(out.loss)
            strategy.after_step()
            trainer.precision.step(opt)
            opt.zero_grad(set_to_none=True)
            loss_sum += out.loss * len(y)  # kept on device: no sync in the hot loop
            correct += (out.logits.argmax(-1) == y).sum()
            for name, value in rule.step_metrics().items():
                extra[name] = extra.get(name, 0) + value.detach().float()
            seen += len(y)
            n += 1
            trainer.advance()
            if n < steps and strategy.stop_agreed(trainer.stop.requested, n):
                self.progress = EpochProgress(n, loss_sum.item(), int(correct.item()), seen, seconds(),
                                              {k: v.item() for k, v in extra.items()})
                return None
        elapsed = seconds()
        loss, hits, seen, extra = strategy.totals(loss_sum, correct, seen, extra)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return EpochTotals(loss.item(), int(hits.item()), seen, n, elapsed,
                           {k: v.item() / max(n, 1) for k, v in extra.items()}, trainer.saved_bytes(), peak)


__all__ = ["EpochLoop", "EpochProgress"]
