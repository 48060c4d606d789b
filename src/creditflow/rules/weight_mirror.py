"""Weight mirror: B learns W from noise sent through each layer."""

import torch
from torch import nn

from ..mechanisms.feedback import mirror_product
from ..registry import register_rule
from .fa import FA


@register_rule("wm", summary="weight mirror: B learns W from noise sent through each layer (mirror mode)",
               paper="Akrout et al. 2019")
class WeightMirror(FA):
    """Weight Mirror (Akrout et al. 2019, mirror mode; ASAP thesis eq. 2.6).

    Engaged mode, every step: forward; backward as FA through ``B`` (weight gradients ``delta h^T``).
    Mirror mode, after every ``mirror_every``-th step, for each Linear/Conv2d:

    1. ``x``: ``n`` noise inputs with i.i.d. ``N(0, sigma^2)`` entries (Conv2d: kernel-sized images).
    2. ``y = W x``, no bias: the layer's output neurons echo the noise.
    3. ``B <- (1 - lambda) B + eta y^T x / n``, where ``E[y^T x / n] = sigma^2 W``.

    Args:
        feedback_scale: ``B_0`` is the layer's own init times this (as FA).
        mirror_lr: ``eta``.  mirror_noise: ``sigma``.  mirror_batch: ``n``.
        mirror_decay: ``lambda``; default ``eta sigma^2``, which makes ``B`` an exponential moving
            average (rate ``eta sigma^2``) of unbiased estimates of ``W``, so ``B -> W`` itself.
        mirror_every: steps between mirror phases.

    Differences from the paper: ``y`` is linear in ``x`` (the paper's small-noise regime; its
    sigmoid demo code, makrout/Deep-Learning-without-Weight-Transport ``fcnn/FCNN_WM.py``, applies
    the layer's nonlinearity). The mirror phase follows the first backward of each forward, so ``B``
    mirrors the ``W`` that was just differentiated and the next step uses it (a second backward
    through the same forward already sees the mirrored ``B``); ``rule.mirror()`` called n times
    before training gives the paper's initial mirroring. Noise comes from the global RNG, after
    the step's forward (dropout sees the random state the step started with).

    References: Akrout et al. 2019, "Deep learning without weight transport", eq. 7 (numbered as
    in their code's comments); Woo 2023 (ASAP thesis), Sec. 2.3.
    """

    #: B learns in mirror mode: the contract's "fixed feedback" check leaves it out
    mutable_buffers = ("feedback",)
    linear_in_loss = False  # B is mirrored after the first backward of a forward

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 feedback_scale: float = 1.0, mirror_lr: float = 0.01, mirror_noise: float = 1.0,
                 mirror_decay: float | None = None, mirror_batch: int = 128, mirror_every: int = 1):
        super().__init__(model, num_classes, loss, feedback_scale)
        decay = mirror_lr * mirror_noise ** 2 if mirror_decay is None else mirror_decay
        if not (mirror_lr > 0 and mirror_noise > 0 and 0 <= decay < 1):
            raise ValueError(f"need mirror_lr > 0, mirror_noise > 0, 0 <= mirror_decay < 1; got "
                             f"{mirror_lr}, {mirror_noise}, {decay}")
        if not (int(mirror_batch) == mirror_batch >= 1 and int(mirror_every) == mirror_every >= 1):
            raise ValueError(f"mirror_batch and mirror_every must be integers >= 1, got {mirror_batch}, {mirror_every}")
        self.eta, self.sigma, self.decay = mirror_lr, mirror_noise, decay
        self.n, self.every = int(mirror_batch), int(mirror_every)
        self.steps = 0  # engaged-mode steps so far; a Python int (no sync), saved as extra state

    @torch.no_grad()
    def mirror(self) -> None:
        """One mirror phase: every layer's ``B`` moves towards its ``W``."""
        for layer in self.layers:
            layer.feedback.mul_(1 - self.decay).add_(mirror_product(layer, self.n, self.sigma), alpha=self.eta)

    def after_backward(self, scale):
        super().after_backward(scale)
        self.steps += 1
        if self.steps % self.every == 0:
            self.mirror()

    def get_extra_state(self):
        return {"steps": self.steps}

    def set_extra_state(self, state):
        self.steps = int(state["steps"])
