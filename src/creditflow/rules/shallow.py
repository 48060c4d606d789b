"""Shallow learning: the LAS paper's control that trains only the last two layers."""

from torch import Tensor, nn

from ..registry import register_rule
from .base import DirectRule


@register_rule("shallow", summary="only the last two layers learn; the rest stay at init",
               paper="Yang, Lee & Park 2024, Sec. IV.A")
class Shallow(DirectRule):
    """Shallow baseline.

    1. Forward; the blocks below the last hidden block are frozen (``requires_grad=False``,
       so they build no graph and are left out of ``parameters()``).
    2. The last hidden block and the head learn by BP on the loss.

    It tells whether a rule's accuracy comes from its signals to the early blocks or only
    from the last two layers, which LAS and LTAS train exactly as BP does.
    """

    top_blocks = 2
    hidden_waits_for_error = False  # frozen blocks get no signal

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy", input_shape=None,
                 blocks=None):
        super().__init__(model, num_classes, loss, input_shape, blocks)
        for block in self._hidden:
            block.requires_grad_(False)

    def signals(self, e: Tensor, target: Tensor, outputs: list[Tensor], blocks: range) -> list[None]:
        return [None] * len(outputs)
