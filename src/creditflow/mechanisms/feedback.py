"""Feedback layers: Linear and Conv2d whose backward sends the error through ``B``.

Forward is the ordinary layer. Backward computes

    grad_input  = what BP computes, with the weight W replaced by B
    grad_weight = what BP computes, from the saved activation ``a`` (the layer input by default)

so BP is ``B = W`` and FA is a fixed random ``B``. Sign-symmetry, Kolen-Pollack, weight mirror
and activation sharing differ only in how ``B`` is made and updated and in which activation
feeds ``grad_weight``: they reuse these layers and never subclass ``nn.Linear``/``nn.Conv2d``.
``B`` is a buffer; :func:`learn_feedback` makes it a Parameter, whose gradient is then the weight
gradient itself (Kolen-Pollack). Activation sharing sets a layer's ``activation_override`` (the
tensor saved for backward instead of the input), ``activation_map`` (applied to it in backward, so
only the override is kept alive) and ``override_feeds_B_only`` (ASFP: the override feeds only B's
gradient, W's comes from the layer's own input, which is then saved too). :func:`mirror_product` is the weight mirror's noise probe.

Shape convention: ``B`` has the shape of ``W``. In the papers' column-vector notation the
feedback matrix is ``B^T`` (``delta_h = B_paper delta_a``), so "B = W^T" there is ``B = W`` here.

References: PyTorch note "Extending torch.autograd"; Lillicrap et al. 2016 (FA).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _trainable(feedback: Tensor) -> bool:
    # Only a leaf that requires grad (a Parameter) learns. A B computed from W inside the graph
    # (say ``B.copy_(W)`` outside no_grad) is a constant here, as it always was: the weight gradient
    # sent into it would flow on into W.
    return feedback.requires_grad and feedback.is_leaf


def _split_weight_grad(grad_w, need_w, need_B):
    """``(grad_weight, grad_feedback)`` from the one weight gradient ``delta a^T``.

    A trainable ``B`` (Kolen-Pollack) receives the weight gradient itself: a copy when ``W`` needs
    it too, so the two ``.grad`` never share storage (an in-place change to one, e.g. weight decay,
    must not reach the other).
    """
    if not need_B:
        return grad_w, None
    return (grad_w, grad_w.clone()) if need_w else (None, grad_w)


class LinearFeedbackFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor, a: Tensor,
                a_map: Callable[[Tensor], Tensor] | None = None, a_feeds_B_only: bool = False):
        # a_feeds_B_only (ASFP): ``a`` feeds only B's gradient, W's comes from x, which is then saved too.
        ctx.save_for_backward(feedback, a, x if a_feeds_B_only else None)
        ctx.a_map = a_map  # applied in backward, so only ``a`` itself is saved (activation sharing)
        ctx.has_bias = bias is not None
        ctx.learn_B = _trainable(feedback)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        feedback, a, x = ctx.saved_tensors
        if ctx.a_map is not None:
            a = ctx.a_map(a)  # (..., in): the activation matched to this layer's input
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        need_B = ctx.learn_B and ctx.needs_input_grad[3]
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N*, out); a view for the usual 2-D case

        def weight_grad(inp: Tensor) -> Tensor:
            return g.T @ inp.reshape(-1, inp.shape[-1])

        # (..., out) @ (out, in): the only line that differs from BP
        grad_x = grad_out @ feedback if need_x else None
        grad_b = g.sum(0) if need_b else None
        if x is not None:  # W learns from x, B from a (ASFP)
            grad_w = weight_grad(x) if need_w else None
            grad_B = weight_grad(a) if need_B else None
        else:
            grad_w, grad_B = _split_weight_grad(weight_grad(a) if need_w or need_B else None, need_w, need_B)
        return grad_x, grad_w, grad_b, grad_B, None, None, None


class Conv2dFeedbackFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, a, stride, padding, dilation, groups, a_map=None,
                a_feeds_B_only=False):
        # a_feeds_B_only (ASFP): ``a`` feeds only B's gradient, W's comes from x, which is then saved too.
        ctx.save_for_backward(weight, feedback, a, x if a_feeds_B_only else None)
        ctx.a_map = a_map  # applied in backward, so only ``a`` itself is saved (activation sharing)
        ctx.x_shape = x.shape  # only the shape: x itself need not stay alive when a is not x
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.learn_B = _trainable(feedback)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        weight, feedback, a, x = ctx.saved_tensors
        if ctx.a_map is not None:
            a = ctx.a_map(a)  # (N, C_in, H, W): the activation matched to this layer's input
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        need_B = ctx.learn_B and ctx.needs_input_grad[3]
        bias_sizes = [weight.shape[0]] if need_b else None

        def conv_backward(inp, kernel, sizes, mask):  # (grad_input, grad_weight, grad_bias) per mask
            return torch.ops.aten.convolution_backward(
                grad_out, inp, kernel, sizes, stride, padding, dilation, False, (0, 0), groups, mask)

        if x is not None:  # W learns from x, B from a (ASFP)
            grad_x, grad_w, grad_b = conv_backward(x, feedback, bias_sizes, (need_x, need_w, need_b))
            grad_B = conv_backward(a, weight, None, (False, True, False))[1] if need_B else None
        else:
            want_w = need_w or need_B  # a trainable B gets the weight gradient too
            contiguous = a.is_contiguous() and weight.is_contiguous() and feedback.is_contiguous()
            if a.shape == ctx.x_shape and contiguous:
                # One call: grad_input from the kernel passed (B), grad_weight from the input passed
                # (a); grad_weight reads only the kernel's shape. Bitwise the two calls below, ~10%
                # faster on CPU for conv3's 5x5 convs. Other layouts (channels_last) take the two
                # calls, since the backend picks its kernel from the layouts of input and kernel.
                grad_x, grad_w, grad_b = conv_backward(a, feedback, bias_sizes, (need_x, want_w, need_b))
            else:
                grad_x = grad_w = grad_b = None
                if need_x:
                    grad_x = conv_backward(grad_out.new_empty(1).expand(ctx.x_shape), feedback, None,
                                           (True, False, False))[0]
                if want_w or need_b:
                    _, grad_w, grad_b = conv_backward(a, weight, bias_sizes, (False, want_w, need_b))
            grad_w, grad_B = _split_weight_grad(grad_w, need_w, need_B)
        return grad_x, grad_w, grad_b, grad_B, None, None, None, None, None, None, None


class _FeedbackModule(nn.Module):
    """What the feedback twins share: ``W``/``b`` of the replaced layer, the buffer ``B``, the
    activation-sharing hooks and the forward. Subclasses give ``_fn`` (their Function), ``_fn_args``
    and ``_plain`` (the layer's own forward, used when no gradient is recorded)."""

    def __init__(self, layer: nn.Module, feedback: Tensor):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.register_buffer("feedback", feedback.detach().clone().contiguous())
        self.activation_override: Tensor | None = None
        #: maps ``activation_override`` to this layer's input shape, in backward (see the Functions)
        self.activation_map: Callable[[Tensor], Tensor] | None = None
        #: True: the override feeds only B's gradient (a trainable B); W's comes from the input
        self.override_feeds_B_only = False

    _fn: type[torch.autograd.Function]
    _fn_args: tuple = ()  # the Function's arguments after ``a`` (the conv geometry)

    def _plain(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self._plain(x)
        if self.activation_override is None:
            return self._fn.apply(x, self.weight, self.bias, self.feedback, x, *self._fn_args)
        return self._fn.apply(x, self.weight, self.bias, self.feedback, self.activation_override,
                              *self._fn_args, self.activation_map, self.override_feeds_B_only)


class FeedbackLinear(_FeedbackModule):
    """A Linear layer's parameters plus a feedback buffer ``B`` used in its backward.

    Holds the *same* ``weight``/``bias`` Parameters as the layer it replaces, so optimizers,
    state dicts (keys ``weight``, ``bias``, ``feedback``) and inference see the original layer.
    """

    _fn = LinearFeedbackFn

    def __init__(self, layer: nn.Linear, feedback: Tensor):
        super().__init__(layer, feedback)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def _plain(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, feedback=B"


class FeedbackConv2d(_FeedbackModule):
    """A Conv2d layer's parameters plus a feedback kernel ``B`` used in its backward."""

    _fn = Conv2dFeedbackFn

    def __init__(self, layer: nn.Conv2d, feedback: Tensor):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("feedback Conv2d supports numeric zero padding only; "
                             f"got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
        super().__init__(layer, feedback)
        self.conv = (layer.stride, layer.padding, layer.dilation, layer.groups)

    @property
    def _fn_args(self) -> tuple:
        return self.conv

    def _plain(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, *self.conv)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, stride={self.conv[0]}, padding={self.conv[1]}, feedback=B"


FeedbackLayer = FeedbackLinear | FeedbackConv2d


def attach_feedback(model: nn.Module, make_feedback: Callable[[nn.Module], Tensor]) -> list[FeedbackLayer]:
    """Replace every ``nn.Linear``/``nn.Conv2d`` in ``model`` (in place) by its feedback twin.

    ``make_feedback(layer)`` returns the initial ``B`` (shape of ``layer.weight``); it is copied,
    so ``B`` never aliases ``W``. Returns the new layers in forward-definition order.
    """
    swapped: list[FeedbackLayer] = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                new: FeedbackLayer = FeedbackLinear(child, make_feedback(child))
            elif isinstance(child, nn.Conv2d):
                new = FeedbackConv2d(child, make_feedback(child))
            else:
                visit(child)
                continue
            setattr(parent, name, new)
            swapped.append(new)

    visit(model)
    if not swapped:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to give feedback weights")
    return swapped


def random_like_init(layer: nn.Module, scale: float = 1.0) -> Tensor:
    """A fresh tensor drawn from the layer's own weight init (Kaiming-uniform, a=sqrt(5)), times ``scale``."""
    b = torch.empty_like(layer.weight)
    nn.init.kaiming_uniform_(b, a=5 ** 0.5)
    return b.mul_(scale)


def init_std(layer: nn.Module) -> float:
    """Standard deviation of :func:`random_like_init`: uniform in ``±1/sqrt(fan_in)``, so ``1/sqrt(3 fan_in)``."""
    return (3 * layer.weight[0].numel()) ** -0.5  # weight[0]: one output unit's fan-in (in/groups * k * k)


def learn_feedback(layer: FeedbackLayer) -> nn.Parameter:
    """Turn the layer's ``B`` from a buffer into a Parameter (same values, same state-dict key).

    The layer's backward then gives ``B`` the weight gradient ``delta a^T`` (Kolen-Pollack). ``B``
    becomes a parameter of the model, so any optimizer over the model's parameters trains it.
    """
    layer.feedback = nn.Parameter(layer.feedback)  # nn.Module drops the buffer of the same name
    return layer.feedback



@torch.no_grad()
def kp_decay_(layers: list[FeedbackLayer], decay: float) -> None:
    """Kolen-Pollack decay: add ``decay * p`` to the ``.grad`` (where there is one) of every layer's
    ``W`` and ``B``, the same L2 decay on both, so ``W - B`` shrinks. Nothing when ``decay`` is 0."""
    if not decay:
        return
    for layer in layers:
        for p in (layer.weight, layer.feedback):
            if p.grad is not None:
                p.grad.add_(p, alpha=decay)

@torch.no_grad()
def mirror_product(layer: FeedbackLayer, n: int, std: float) -> Tensor:
    """One weight-mirror estimate of ``W`` (shape of ``W``): noise sent through the layer.

    ``x``: ``n`` samples of i.i.d. ``N(0, std^2)`` inputs; ``y = W x`` (no bias); returns
    ``y^T x / n``, whose expectation is ``std^2 W`` (``E[x x^T] = std^2 I``). For a Conv2d the
    samples are noise images the size of the (dilated) kernel, so each gives one output position
    and every kernel tap sees all ``n`` samples (no padding: ``E`` is exactly ``std^2 W``), and the
    product is the conv weight gradient of ``x`` and ``y``. Noise comes from the global RNG.

    References: Akrout et al. 2019, mirror mode (their eq. 7).
    """
    W = layer.weight
    if isinstance(layer, FeedbackLinear):
        x = torch.randn(n, W.shape[1], dtype=W.dtype, device=W.device).mul_(std)  # (n, in)
        return (x @ W.T).T @ x / n  # y: (n, out); y^T x: (out, in)
    _, _, dilation, groups = layer.conv
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, W.shape[2:])]
    x = torch.randn(n, W.shape[1] * groups, *extent, dtype=W.dtype, device=W.device).mul_(std)
    y = F.conv2d(x, W, None, 1, 0, dilation, groups)  # (n, out, 1, 1)
    return torch.nn.grad.conv2d_weight(x, W.shape, y, 1, 0, dilation, groups) / n


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every feedback layer turned back into ``nn.Linear``/``nn.Conv2d``.

    The copy's layers hold copies of the weights (``requires_grad`` as in ``model``) and back-propagate
    with ``W``: plain BP on the same network, e.g. the reference of the alignment tool. ``model``
    itself is untouched; gradients already in ``.grad`` are not copied.
    """
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:  # deepcopy would copy every .grad too: memory the copy has no use for
        p.grad = None
    try:
        twin = copy.deepcopy(model)
    finally:
        for p, g in grads.items():
            p.grad = g

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, FeedbackLinear):
                plain: nn.Module = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                             device="meta")
            elif isinstance(child, FeedbackConv2d):
                out_c, in_per_group, *kernel = child.weight.shape
                stride, padding, dilation, groups = child.conv
                plain = nn.Conv2d(in_per_group * groups, out_c, tuple(kernel), stride, padding, dilation, groups,
                                  bias=child.bias is not None, device="meta")
            else:
                visit(child)
                continue
            # The copy's Parameters move over as they are; the meta placeholders never allocate.
            plain.weight, plain.bias = child.weight, child.bias
            plain.train(child.training)
            setattr(parent, name, plain)

    if isinstance(twin, (FeedbackLinear, FeedbackConv2d)):  # a bare layer, not a container
        holder = nn.Sequential(twin)
        visit(holder)
        return holder[0]
    visit(twin)
    return twin
