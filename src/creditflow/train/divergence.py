"""The divergence watch: a NaN/Inf loss, or one far over the first step's, stops a run at its step."""

from __future__ import annotations

import torch


class Diverged(RuntimeError):
    """Training stopped because the loss diverged; the message says whether a checkpoint is kept."""


class NonFiniteLoss(Diverged):
    """Training produced a NaN/Inf loss."""


#: steps between host syncs that look at the divergence flags (the step itself is recorded on the device)
DIVERGENCE_CHECK_EVERY = 50


class DivergenceWatch:
    """The first step whose loss is NaN/Inf or over ``factor`` x the first step's, kept on the device.

    ``observe`` is a few scalar kernels and no host sync, so the hot loop stays asynchronous;
    ``check`` syncs once (every :data:`DIVERGENCE_CHECK_EVERY` steps and at epoch end) and reports
    the exact step. Tensors only: it travels in a pipeline stage's statistics as plain numbers.
    """

    def __init__(self, factor: float, device: torch.device, initial: float | None = None):
        self.factor = factor
        self.initial = self.limit = None
        if initial is not None:
            self._start(torch.tensor(initial, device=device))
        self.step = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet
        self.loss = torch.zeros((), device=device)

    def _start(self, first: torch.Tensor) -> None:
        self.initial = first.abs()
        # beyond the limit, or NaN (every comparison with NaN is False); float max, not inf, so that an Inf
        # loss is over it too. A first loss of 0 (a pipeline stage without one) has nothing to grow from.
        big = torch.tensor(torch.finfo(first.dtype).max, device=first.device)
        self.limit = torch.where(self.initial > 0, self.factor * self.initial, big) if self.factor else big

    def observe(self, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        if self.initial is None:
            self._start(loss)
        new = ~(loss.abs() <= self.limit) & (self.step < 0)  # 7 scalar kernels, no sync
        self.step = torch.where(new, step, self.step)
        self.loss = torch.where(new, loss, self.loss)

    def check(self) -> tuple[int, float, float] | None:
        """``(global step, its loss, the first step's loss)`` of the first bad step, or None (one host sync)."""
        step = int(self.step)
        return None if step < 0 else (step, float(self.loss), self.initial_loss())

    def initial_loss(self) -> float | None:
        return None if self.initial is None else float(self.initial)


__all__ = ["DIVERGENCE_CHECK_EVERY", "Diverged", "DivergenceWatch", "NonFiniteLoss"]
