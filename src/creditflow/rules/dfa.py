"""Direct feedback alignment."""

import torch
from torch import Tensor, nn

from ..mechanisms import DirectFeedback, check_feedback_init
from ..registry import register_rule
from .base import DirectRule, placement


@register_rule("dfa", summary="direct feedback alignment: each block gets B_i e at its output",
               paper="Nøkland 2016")
class DFA(DirectRule):
    """Direct Feedback Alignment.

    1. Forward; every block input is cut from the graph.
    2. ``e = dL/da_L`` at the output; the head learns from ``e`` as in BP.
    3. Hidden block i gets ``s_i = B_i e`` at its output (a fixed random ``B_i``; for conv
       blocks ``B_i`` maps ``e`` to the block's (C, H, W)), then back-propagates it inside itself.

    Args:
        feedback_init: ``"random"``: uniform in ``±feedback_scale/sqrt(n_i)``, n_i the block size;
            ``"product"``: ``B_i = W_L ... W_{i+1}`` from the initial forward weights (fully
            connected models only), the LAS paper's choice for its alignment experiment.
        feedback_scale: see above (random init only).
        seed: seeds ``B`` independently of the global RNG (None: use the global RNG).
        blocks: names of the modules whose outputs end the blocks (any model; see ``DirectRule``).

    Differences from the paper: the signal enters at the block output ``h_i``, so
    ``delta_i = (B_i e) * f'(a_i)`` (paper eq. 16) comes from autograd inside the block.
    """

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 input_shape=None, feedback_init: str = "random", feedback_scale: float = 1.0,
                 seed: int | None = None, blocks=None):
        super().__init__(model, num_classes, loss, input_shape, blocks)
        check_feedback_init(feedback_init)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.feedback = DirectFeedback(self.feedback_shapes(), num_classes, feedback_scale,
                                       gen).to(**placement(model))
        if feedback_init == "product":
            self.feedback.set_matrices(self.downstream_products())

    def feedback_matrices(self) -> list[Tensor]:
        return self.feedback.matrices

    def signals(self, e: Tensor, target: Tensor, outputs: list[Tensor], blocks: range) -> list[Tensor]:
        return self.feedback(e, blocks)
