"""Back-propagation: the reference every other rule is measured against."""

from ..registry import register_rule
from .base import Rule


@register_rule("bp", summary="back-propagation (plain autograd), the reference",
               paper="Rumelhart et al. 1986")
class BP(Rule):
    """Back-propagation.

    1. Forward through the whole model.
    2. ``loss.backward()``: every layer gets ``W^T delta`` from the layer above.
    """

    @classmethod
    def model_refusal(cls, model):
        return None  # any model; an associated-learning net end to end, through its inference path
