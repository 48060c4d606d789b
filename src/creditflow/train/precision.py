"""``--precision``: autocast for the training step, and loss scaling for float16.

``bf16``: the step's forward under ``torch.autocast`` to bfloat16 (CPU and CUDA); its range is
float32's, so no scaling. ``fp16``: autocast to float16 with a ``torch.amp.GradScaler``: the rule's
backward is told the scale (``rule.step(x, y, scale=...)``, a tensor: no host sync), so every gradient, the rule's own
terms included, carries it, and ``scaler.step`` unscales, skips a step with inf/NaN gradients and
adapts the scale. Evaluation runs in float32. Parameters and optimizer state stay float32.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name not in DTYPES:
            raise ValueError(f"unknown precision {name!r}; available: {', '.join(DTYPES)}")
        self.name, self.device, self.dtype = name, device, DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def scale(self) -> float | torch.Tensor:
        """The loss scale of this step: 1 without fp16; with it, the scaler's scale as a tensor on the
        device (scaling a one also starts the scaler's state; no host sync)."""
        if self.scaler is None:
            return 1.0
        return self.scaler.scale(torch.ones((), device=self.device))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # unscales, and skips the step where a gradient is inf/NaN
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
