"""Direct feedback learned by local alignment support modules (LAS) and its target variant (LTAS)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..mechanisms import check_feedback_init, local_module
from ..registry import register_rule
from .base import DirectRule, placement


def last_conv_kernel(block: nn.Module) -> int | None:
    """The kernel of the block's last Conv2d, if it is odd (a ViT's 16x16 patch embedding is not)."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    k = convs[-1].kernel_size[0] if convs else None
    return k if k is not None and k % 2 else None


@register_rule("las", summary="DFA whose feedback is learned by local modules mimicking the output a_L",
               paper="Yang, Lee & Park 2024")
class LAS(DirectRule):
    """Learning with Local Alignment Support (LAS paper, Algorithm 1).

    1. Forward; every block input is cut. Hidden block i (all but the last) carries a local
       module ``y_i = B_i^T h_i`` (conv blocks: one conv to C planes + global average pooling).
    2. ``e = dL/da_L``. The head and the last hidden block learn from ``e`` as in BP
       (``delta_{L-1} = W_L^T e``, eq. 23).
    3. Block i receives the module's backward applied to ``e`` (``B_i e``, eq. 24) at its output.
    4. Each module learns on ``L_i = ||y_i - a_L||^2`` (eq. 20) from the detached ``h_i`` and
       ``a_L``: the module's weights track the block's direct path to the output.

    Args:
        feedback_init: ``"random"`` (PyTorch's Linear/Conv2d init range) or ``"product"``
            (module weights = ``W_L ... W_{i+1}`` at init; fully connected models only).
        local_kernel_size: kernel of conv modules; default: that of the block's last conv if odd, else 3.
        local_pool: global pooling of conv modules: ``"avg"`` (the paper's "global pooling"; default)
            or ``"max"`` (the authors' code).
        local_scale: ``L_i = local_scale * ||y_i - a_L||^2``; 0.5 (default) makes the module's gradient
            ``h_i (y_i - a_L)^T``, Algorithm 1 line 13's update; 1 is eq. 20 as printed (twice that).
        update_first: Algorithm 1 lines 13-14 (Algorithm 2 line 5 for LTAS): the rule itself takes one
            SGD step of size ``local_lr`` on each module, then forms the block's signal with the updated
            module; the modules then leave the optimizer (``self_trained``). False (default): the modules
            step with the caller's optimizer, after the step, so the signal uses them before that update.
        local_lr: the modules' SGD step with ``update_first``.

    Differences from the paper: gradient descent on the stated losses (the paper's printed
    updates mix ``e = y* - y`` with a minus sign); ``L_i`` is averaged over the batch; the modules
    step with the caller's optimizer unless ``update_first`` (docs/rules.md has the measured effect).
    """

    top_blocks = 2  # the last hidden block gets the true W_L^T e
    per_block_modules = ("local",)

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy", input_shape=None,
                 feedback_init: str = "random", local_kernel_size: int | None = None, local_pool: str = "avg",
                 local_scale: float = 0.5, update_first: bool = False, local_lr: float = 1e-3, blocks=None):
        super().__init__(model, num_classes, loss, input_shape, blocks)
        check_feedback_init(feedback_init)
        if not local_scale > 0:
            raise ValueError(f"local_scale must be > 0, got {local_scale}")
        if update_first and not local_lr > 0:
            raise ValueError(f"local_lr must be > 0 with update_first, got {local_lr}")
        self.require_flat_output()  # a module mimics one output vector per sample
        self.local_scale, self.update_first, self.local_lr = local_scale, update_first, local_lr
        self.local = nn.ModuleList(
            local_module(shape, num_classes, local_kernel_size or last_conv_kernel(block) or 3, local_pool)
            for shape, block in zip(self.hidden_output_shapes(), self._hidden)
        ).to(**placement(model))
        if feedback_init == "product":
            for module, product in zip(self.local, self.downstream_products()):
                with torch.no_grad():
                    module.weight.copy_(product)

    def self_trained(self) -> list[nn.Parameter]:
        return list(self.local.parameters()) if self.update_first else []

    def before_signals(self, outputs: list[Tensor], logits: Tensor | None, target: Tensor, blocks: range) -> None:
        if not (self.update_first and outputs):
            return
        with torch.enable_grad():  # lines 13 (LAS) / 5 (LTAS): the module steps before delta is formed with it
            params = [p for m in self.local[blocks.start:blocks.stop] for p in m.parameters()]
            grads = torch.autograd.grad(self.module_loss(outputs, logits, target, blocks), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=-self.local_lr)

    def signals(self, e: Tensor, target: Tensor, outputs: list[Tensor], blocks: range) -> list[Tensor]:
        return [m.feedback(e, h.detach()) for m, h in zip(self.local[blocks.start:blocks.stop], outputs)]

    def local_target(self, logits: Tensor, target: Tensor):
        return logits.detach()  # a_L

    def local_objective(self, y_i: Tensor, goal) -> Tensor:
        return self.local_scale * (y_i - goal).pow(2).sum(-1).mean()  # local_scale * ||y_i - a_L||^2

    def module_loss(self, outputs: list[Tensor], logits: Tensor | None, target: Tensor, blocks: range) -> Tensor:
        goal = self.local_target(logits, target)
        return sum(self.local_objective(m(h.detach()), goal) for m, h in zip(self.local[blocks.start:blocks.stop], outputs))

    def local_loss(self, outputs: list[Tensor], logits: Tensor | None, target: Tensor, blocks: range) -> Tensor | None:
        if self.update_first or not outputs:
            return None  # trained inside the step (before_signals), or nothing to train
        return self.module_loss(outputs, logits, target, blocks)

    def feedback_matrices(self) -> list[Tensor]:
        return [m.weight.detach() for m in self.local]


@register_rule("ltas", summary="LAS with local modules trained on the target (softmax cross-entropy)",
               paper="Yang, Lee & Park 2024")
class LTAS(LAS):
    """Learning with Local Target Alignment Support (LAS paper, Algorithm 2).

    As LAS, but module i learns to predict the target: ``L_i = CE(softmax(y_i), y*)`` (eq. 26,
    whose gradient is eq. 27's update). It needs no network output, so (Algorithm 2, line 5) a
    module may update during the forward pass, before its block's signal is formed: ``update_first``
    (``update_early`` is its older name). Options as LAS; ``local_scale`` does not apply.
    """

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy", input_shape=None,
                 feedback_init: str = "random", local_kernel_size: int | None = None, local_pool: str = "avg",
                 update_first: bool = False, local_lr: float = 1e-3, blocks=None, update_early: bool | None = None):
        super().__init__(model, num_classes, loss, input_shape, feedback_init, local_kernel_size, local_pool,
                         1.0, update_first if update_early is None else update_early, local_lr, blocks)

    needs_target = True

    def local_target(self, logits: Tensor, target: Tensor):
        return target  # y*: the logits are not needed, so a pipeline stage may update before they exist

    def local_objective(self, y_i: Tensor, goal) -> Tensor:
        return F.cross_entropy(y_i, goal)
