"""Sign symmetry: feedback that shares W's signs, not its magnitudes (uSF, brSF, frSF)."""

import torch
from torch import nn

from ..mechanisms.feedback import init_std, random_like_init
from ..registry import register_rule
from .fa import FA


class SignSymmetry(FA):
    """Sign-concordant feedback: ``B = M ∘ sign(W)``, re-signed from the current ``W`` before every step.

    1. Every Linear/Conv2d gets a feedback buffer ``B`` (shape of ``W``); ``|B|`` is the magnitude ``M``.
    2. At the start of each step ``B <- |B| ∘ sign(W)``: ``W`` as the optimizer left it.
    3. Forward and backward as FA: the error goes down through ``B``; weight gradients ``delta h^T``.

    The family differs only in ``M`` (Liao, Leibo & Poggio 2016): frSF keeps FA's random draw
    for good, uSF uses one constant per layer, brSF redraws ``|M|`` after every batch. ``sign`` is
    ``W``'s sign bit (``copysign``): an exactly-zero weight gives ``±M``, not 0, so ``M`` lives in ``B``.

    Args:
        feedback_scale: ``M`` is drawn from the layer's own init (uniform in ``±1/sqrt(fan_in)``)
            times this; uSF's constant is that distribution's std, ``1/sqrt(3 fan_in)``, times this.

    References: Liao, Leibo & Poggio 2016, "How important is weight symmetry in backpropagation?"
    (uSF, brSF, frSF; as restated in jsalbert/biotorch ``layers/{usf,brsf,frsf}``); Xiao et al. 2018.
    """

    #: B follows W's sign by design: the contract's "fixed feedback" check leaves it out
    mutable_buffers = ("feedback",)

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 feedback_scale: float = 1.0):
        super().__init__(model, num_classes, loss, feedback_scale)
        self.feedback_scale = feedback_scale
        self.follow_sign()

    @torch.no_grad()
    def follow_sign(self) -> None:
        for layer in self.layers:
            layer.feedback.copysign_(layer.weight)  # |B| ∘ sign(W), in place

    def before_step(self):
        super().before_step()
        self.follow_sign()  # the signs of the weights this step differentiates


@register_rule("frsf", summary="sign symmetry, fixed random magnitude: B = |M| sign(W), M drawn once",
               paper="Liao, Leibo & Poggio 2016")
class FRSF(SignSymmetry):
    """Fixed Random-magnitude Sign-concordant Feedback: ``M`` is FA's random ``B``, drawn once."""


@register_rule("usf", summary="sign symmetry, uniform magnitude: B = sign(W) times a per-layer scale",
               paper="Liao, Leibo & Poggio 2016; Xiao et al. 2018")
class USF(SignSymmetry):
    """Uniform Sign-concordant Feedback: ``B = s sign(W)``, ``s = feedback_scale / sqrt(3 fan_in)``.

    Xiao et al. 2018 (ImageNet "sign-symmetry") also scale by a constant from the layer's init
    (willwx/sign-symmetry ``modules/af_linear_module.py``: ``1/sqrt(fan_in)``); ours is this
    library's init std, so ``||B||`` is FA's. Only ``B``'s direction matters much with Adam.
    """

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 feedback_scale: float = 1.0):
        super().__init__(model, num_classes, loss, feedback_scale)
        with torch.no_grad():
            for layer in self.layers:
                layer.feedback.fill_(feedback_scale * init_std(layer))
        self.follow_sign()


@register_rule("brsf", summary="sign symmetry, batchwise random magnitude: |M| redrawn every batch",
               paper="Liao, Leibo & Poggio 2016")
class BRSF(SignSymmetry):
    """Batchwise Random-magnitude Sign-concordant Feedback: ``|M|`` is redrawn after every batch.

    Differences from the paper: none (a fixed ``|B0|``, as "B = |B0| sign(W)" reads, is frSF). ``M``
    is drawn (global RNG) when the first backward of each forward has finished: the forward's
    dropout sees BP's random state, and data-parallel ranks take rank 0's draw with the other
    rule-rewritten buffers. A second backward through the same forward uses the new ``B``.
    """

    linear_in_loss = False  # B is redrawn after the first backward of a forward

    def after_backward(self, scale):
        super().after_backward(scale)
        with torch.no_grad():
            for layer in self.layers:
                layer.feedback.copy_(random_like_init(layer, self.feedback_scale))
        self.follow_sign()  # B stays sign-concordant between steps (what alignment tools read)
