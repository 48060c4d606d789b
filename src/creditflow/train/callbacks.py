"""What is measured beside training: the :class:`Callback` hooks, and the saved-activation meter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..diagnostics import saved_tensor_bytes

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """What is measured beside training. Every hook is optional; they run in every process."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        """Before each step, in every process (``step``: the run's global step; tests kill a process here)."""

    def around_step(self, trainer: Trainer, step: int, x, y, run: Callable[[], Any]) -> Any:
        """Wrap one ``rule.step`` (one-process strategies): measure around it, return ``run()``."""
        return run()

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer) -> None:
        """Before a checkpoint inside an epoch (a signal stopped the run) is written: save what must
        resume with it (the main process)."""

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any] | None) -> None: ...


class SavedActivations(Callback):
    """Bytes the step saves for backward, measured on the first step of each epoch (the hooks cost time)."""

    def __init__(self):
        self.value: int | None = None

    def on_epoch_start(self, trainer, epoch):
        self.value = None

    def around_step(self, trainer, step, x, y, run):
        if self.value is not None:
            return run()
        held = {}
        self.value = saved_tensor_bytes(lambda: held.setdefault("out", run()), exclude=trainer.rule)
        return held["out"]


__all__ = ["Callback", "SavedActivations"]
