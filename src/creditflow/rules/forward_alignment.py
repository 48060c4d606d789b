"""Forward alignment: exact errors, weight updates from an approximate forward path."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..mechanisms import attach_feedback, random_like_init
from ..mechanisms.feedback import FixedActivations, feedback_policy
from ..registry import register_rule
from .base import Rule


@register_rule("foa", summary="forward alignment: exact errors, weight gradients from a fixed random forward path C",
               paper="Woo 2023 (ASAP thesis), ch. 3")
class ForwardAlignment(Rule):
    """Forward Alignment (FoA): approximate the *forward* path, not the feedback path.

    Key: ``W`` forward weight, ``C`` fixed random forward weight (shape of ``W``), ``h`` true
    activation, ``h~`` approximate activation, ``delta`` the back-propagated error.

    1. Forward as usual, ``h_{l+1} = phi(W_{l+1} h_l + b_{l+1})`` (eq. 3.7): the logits.
    2. Beside it, the approximate path ``h~_{l+1} = phi(C_{l+1} h~_l + b_{l+1})``, ``h~_0 = x``
       (eq. 3.8): the same network with every ``W`` replaced by its ``C``, under ``no_grad``.
    3. Errors exactly as BP (eq. 3.9): ``delta_l = phi'(a_l) W_{l+1}^T delta_{l+1}``, so the
       feedback ``B`` of each layer *is* ``W`` (re-tied before every step).
    4. ``grad W_{l+1} = delta_{l+1} h~_l^T`` (eq. 3.10): the layer's weight gradient reads
       ``h~_l`` instead of ``h_l``. Biases and norm parameters get BP's gradient (no activation
       enters them). The first layer reads ``h~_0 = x``: its gradient is BP's.

    Equals BP when every ``C = W`` (then ``h~ = h``); tested. Inference is the plain model.

    Args:
        forward_scale: ``C`` is drawn from the layer's own init (Kaiming-uniform) times this.

    Differences from the thesis: it writes Sec. 3.1 for a linear network without biases
    (``h~_{l+1} = C_{l+1} h~_l``); for nonlinear networks (its Table 3.1, BN + ReLU) the
    approximate path here keeps the network's own nonlinearities, biases and BatchNorm (batch
    statistics; running statistics are not touched by it) and replaces only ``W`` by ``C``.
    Sec. 3.2 writes ``Delta W = +eta delta h~^T`` with ``delta = (T - W2 W1) x``; we do gradient
    descent on the stated loss (``delta = dL/da``, the optimizer subtracts).

    References: Sunghyeon Woo 2023, "Biologically plausible learning algorithm without weight transport
    and bidirectional connection" (SNU master's thesis), ch. 3, eqs. 3.7-3.10.
    """

    #: B is re-tied to W before every step (the feedback path is exact), so it changes with W
    mutable_buffers = ("feedback",)

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 forward_scale: float = 1.0):
        super().__init__(model, num_classes, loss)
        if not forward_scale > 0:
            raise ValueError(f"forward_scale must be > 0, got {forward_scale}")
        self.layers = attach_feedback(model, lambda layer: layer.weight.detach())
        self.forward_weights = nn.Module()  # C_l: buffers "layer<l>", fixed
        for i, layer in enumerate(self.layers):
            self.forward_weights.register_buffer(f"layer{i}", random_like_init(layer, forward_scale))
        names = {id(p): n for n, p in model.named_parameters()}
        self._weight_names = [names[id(layer.weight)] for layer in self.layers]
        self.tie_feedback()

    @property
    def C(self) -> list[Tensor]:
        return [getattr(self.forward_weights, f"layer{i}") for i in range(len(self.layers))]

    def tie_feedback(self) -> None:
        # B = W exactly: a detached alias, so no copy and it follows every in-place optimizer step.
        for layer in self.layers:
            layer.feedback = layer.weight.detach()

    @torch.no_grad()
    def approximate_activations(self, x: Tensor) -> list[Tensor]:
        """``h~_{l-1}`` for every layer l (its input on the path with ``W`` replaced by ``C``)."""
        inputs: dict[int, list[Tensor]] = {id(layer): [] for layer in self.layers}
        hooks = [layer.register_forward_pre_hook(lambda m, args: inputs[id(m)].append(args[0])) for layer in self.layers]
        # Every buffer gets a private copy: the approximate path must not move BN's running stats.
        state = {k: v.clone() for k, v in self.model.named_buffers() if not k.endswith("feedback")}
        state.update(zip(self._weight_names, self.C))
        try:
            # C and W are never tied: skip the per-call search for tied tensors (measured on the
            # 10-10-10 net: 0.26 -> 0.21 ms of the approximate path, within a whole step's noise)
            functional_call(self.model, state, (x,), tie_weights=False)
        finally:
            for h in hooks:
                h.remove()
        if any(len(v) != 1 for v in inputs.values()):
            raise ValueError("forward alignment needs every Linear/Conv2d to run exactly once per forward")
        return [inputs[id(layer)][0] for layer in self.layers]

    def feedback_pairs(self):
        # The thesis (Fig. 3.2) measures the angle between W and the fixed forward weight C.
        return {f"layer{i}": (C, layer.weight.detach()) for i, (C, layer) in enumerate(zip(self.C, self.layers))}

    def before_step(self):
        super().before_step()
        self.tie_feedback()

    def forward_context(self, x: Tensor | None = None):
        if x is None:
            raise ValueError("forward alignment reads the network input: forward_context(x)")
        approx = self.approximate_activations(x)  # h~_{l-1}: like each layer's input
        # exact forward and errors; grad W = delta h~^T
        return feedback_policy(FixedActivations(dict(zip(map(id, self.layers), approx))))
