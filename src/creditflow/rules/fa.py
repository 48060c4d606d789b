"""Feedback alignment."""

from torch import nn

from ..mechanisms import attach_feedback, random_like_init
from ..registry import register_rule
from .base import Rule


@register_rule("fa", summary="feedback alignment: fixed random B replaces W^T in the backward",
               paper="Lillicrap et al. 2016")
class FA(Rule):
    """Feedback Alignment.

    1. Every Linear/Conv2d gets a fixed random feedback weight ``B`` (a buffer, shape of ``W``).
    2. Forward as usual.
    3. Backward as BP, but each layer sends ``B^T delta`` down instead of ``W^T delta``;
       weight gradients are BP's (``delta h^T``).

    Args:
        feedback_scale: ``B`` is drawn from the layer's own init distribution times this.

    Differences from the paper: none. The model's layers are replaced in place by feedback
    layers that share their Parameters (state-dict keys ``weight``, ``bias`` plus ``feedback``).
    """

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 feedback_scale: float = 1.0):
        super().__init__(model, num_classes, loss)
        if not feedback_scale > 0:
            raise ValueError(f"feedback_scale must be > 0, got {feedback_scale}")
        self.layers = attach_feedback(model, lambda layer: random_like_init(layer, feedback_scale))

    def feedback_pairs(self):
        return {f"layer{i}": (layer.feedback, layer.weight.detach()) for i, layer in enumerate(self.layers)}
