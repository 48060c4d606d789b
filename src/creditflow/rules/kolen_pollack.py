"""Modified Kolen-Pollack: B gets W's update, and decay pulls the two together."""

from torch import nn

from ..mechanisms.feedback import kp_decay_, learn_feedback
from ..registry import register_rule
from .fa import FA


@register_rule("kp", summary="Kolen-Pollack: B gets W's gradient and weight decay too, so B -> W",
               paper="Akrout et al. 2019")
class KolenPollack(FA):
    """Modified Kolen-Pollack (Akrout et al. 2019; ASAP thesis eq. 2.7 and Sec. 4.2.1).

    1. Every Linear/Conv2d gets a random ``B`` (FA's draw), a *trainable* Parameter.
    2. Forward; backward as FA: the error goes down through ``B`` instead of ``W``.
    3. ``W`` and ``B`` receive the same gradient ``delta h^T`` plus decay on themselves:
       ``grad W = delta h^T + lambda W``, ``grad B = delta h^T + lambda B``.

    With plain SGD of step ``eta`` on both, ``W - B <- (1 - eta lambda)(W - B)``, so
    ``W_t - B_t = (1 - eta lambda)^t (W_0 - B_0)``: ``B`` converges to ``W`` (BP) with no weight
    transport. Akrout et al.'s ``lambda`` is the per-step factor, our ``eta * kp_decay``.

    Args:
        feedback_scale: ``B_0`` is the layer's own init times this (as FA).
        kp_decay: ``lambda``, added to the gradients of every feedback layer's ``W`` and ``B``.

    Differences from the paper: none. ``B`` is ``<layer>.feedback`` (a model parameter; the same
    state-dict key as FA's buffer) and forms its own group in ``rule.param_groups()``. KP needs
    ``W`` and ``B`` to get the same update: give that group ``W``'s hyperparameters (the default).
    An optimizer's own weight decay then acts on both alike and adds to ``kp_decay``. The update is
    identical for SGD with or without momentum; with Adam, ``kp_decay`` enters the moments
    unequally, so prefer ``kp_decay=0`` with AdamW's decoupled decay for an exact KP.

    References: Akrout et al. 2019, "Deep learning without weight transport", eqs. 16-17 (as
    their README numbers them); Kolen & Pollack 1994; Woo 2023 (ASAP thesis), Sec. 4.2.1.
    """

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 feedback_scale: float = 1.0, kp_decay: float = 1e-4):
        super().__init__(model, num_classes, loss, feedback_scale)
        if not kp_decay >= 0:
            raise ValueError(f"kp_decay must be >= 0, got {kp_decay}")
        self.kp_decay = kp_decay
        for layer in self.layers:
            learn_feedback(layer)  # its backward now gives B the weight gradient delta h^T

    def local_parameters(self) -> list[nn.Parameter]:
        return [layer.feedback for layer in self.layers if layer.feedback.requires_grad]


    def after_backward(self, scale):
        super().after_backward(scale)
        kp_decay_(self.layers, self.kp_decay * scale)  # L2 decay, the same on W and B
