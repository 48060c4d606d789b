"""Direct random target projection."""

from torch import Tensor
from torch.nn import functional as F

from ..registry import register_rule
from .dfa import DFA


@register_rule("drtp", summary="DFA with the target in place of the error: block i gets B_i y*",
               paper="Frenkel, Lefebvre & Bol 2021")
class DRTP(DFA):
    """Direct Random Target Projection.

    1. Forward; every block input is cut from the graph.
    2. Block i gets ``s_i = B_i (-y*) / N`` at its output (y*: one-hot target), so it can update
       before the output exists; the head learns from ``e`` as in BP.
    3. Each block back-propagates ``s_i`` inside itself.

    Differences from the paper: the surrogate error is ``-y*/N``, the part of the mean
    cross-entropy gradient ``(p - y*)/N`` that does not depend on the output, so DRTP and DFA
    with the same ``B`` push in the same direction. (``B`` and ``-B`` are equally likely, so the
    sign does not change the rule.) Options as DFA.
    """

    hidden_waits_for_error = False  # B_i y* needs no output: a pipeline stage never waits
    needs_target = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.require_flat_output()  # y* is one class per sample

    def signals(self, e: Tensor, target: Tensor, outputs: list[Tensor], blocks: range) -> list[Tensor]:
        return self.feedback(F.one_hot(target, e.shape[1]).to(e.dtype).div_(-len(target)), blocks)
