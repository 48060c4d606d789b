"""Feedback layers: Linear and Conv2d whose backward sends the error through ``B``.

Forward is the ordinary layer. Backward computes

    grad_input  = what BP computes, with the weight W replaced by B
    grad_weight = what BP computes, from the saved activation ``a`` (the layer input by default)

so BP is ``B = W`` and FA is a fixed random ``B``. Sign-symmetry, Kolen-Pollack, weight mirror
and activation sharing differ only in how ``B`` is made and updated and in which activation
feeds ``grad_weight``: they reuse these layers and never subclass ``nn.Linear``/``nn.Conv2d``.
``B`` is a buffer; :func:`learn_feedback` makes it a Parameter, whose gradient is then the weight
gradient itself (Kolen-Pollack). Which activation a step's weight gradients read is not stored on
the layers: a rule enters :func:`feedback_policy` around its forward (activation sharing, forward
alignment), and each layer asks the policy when it runs. A converted layer stays what it was
(``isinstance(layer, nn.Linear)`` holds); :func:`plain_copy` gives the plain network back.
:func:`mirror_product` is the weight mirror's noise probe.

Shape convention: ``B`` has the shape of ``W``. In the papers' column-vector notation the
feedback matrix is ``B^T`` (``delta_h = B_paper delta_a``), so "B = W^T" there is ``B = W`` here.

References: PyTorch note "Extending torch.autograd"; Lillicrap et al. 2016 (FA).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _trainable(feedback: Tensor) -> bool:
    # Only a leaf that requires grad (a Parameter) learns. A B computed from W inside the graph
    # (say ``B.copy_(W)`` outside no_grad) is a constant here, as it always was: the weight gradient
    # sent into it would flow on into W.
    return feedback.requires_grad and feedback.is_leaf


def _like(grad_out: Tensor, *tensors: Tensor | None) -> list[Tensor | None]:
    """``tensors`` in ``grad_out``'s dtype. Under autocast the layer computed in bfloat16/float16 from
    float32 ``W``, ``B`` and activations; its backward does what autocast's own backward of the layer
    does: the products in the gradient's (lower) precision. Autograd casts each returned gradient to
    its input's dtype (a float32 weight gets a float32 ``.grad``)."""
    return [t if t is None or t.dtype == grad_out.dtype else t.to(grad_out.dtype) for t in tensors]


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
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor, a: Tensor | None,
                a_map: Callable[[Tensor], Tensor] | None = None, a_feeds_B_only: bool = False):
        # a None: the layer's own input (BP's weight gradient). Passing x twice instead would stop
        # torch.compile (it cannot trace one tensor given to two inputs of a Function).
        a = x if a is None else a
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
        feedback, a, x = _like(grad_out, feedback, a, x)
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
        a = x if a is None else a  # None: the layer's own input (see LinearFeedbackFn)
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
        weight, feedback, a, x = _like(grad_out, weight, feedback, a, x)
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
                if need_x:  # the input only gives its shape, as torch.nn.grad.conv2d_input passes it too
                    grad_x = conv_backward(grad_out.new_empty(1).expand(ctx.x_shape), feedback, None,
                                           (True, False, False))[0]
                if want_w or need_b:
                    _, grad_w, grad_b = conv_backward(a, weight, bias_sizes, (False, want_w, need_b))
            grad_w, grad_B = _split_weight_grad(grad_w, need_w, need_B)
        return grad_x, grad_w, grad_b, grad_B, None, None, None, None, None, None, None


@dataclass(frozen=True)
class SavedActivation:
    """What a feedback layer's weight gradient reads instead of its own input, for one forward."""

    a: Tensor  # saved for backward in place of the input
    #: applied to ``a`` in backward (matching it to the layer's input shape), so only ``a`` is kept alive
    a_map: Callable[[Tensor], Tensor] | None = None
    #: True (ASFP): ``a`` feeds only B's gradient; W's comes from the layer's input, which is saved too
    feeds_B_only: bool = False


class FeedbackPolicy:
    """Per-step feedback behaviour: which activation each feedback layer's weight gradient reads.

    A rule enters ``feedback_policy(policy)`` around its forward; every feedback layer that runs
    asks ``policy.saved_activation(layer, x)`` (``x``: the layer's input) and saves what it gets
    (None: its own input, as BP). Nothing is stored on the layers, so inference, copies of the
    model and other rules never see a step's choice.
    """

    def saved_activation(self, layer: nn.Module, x: Tensor) -> SavedActivation | None:
        return None


class FixedActivations(FeedbackPolicy):
    """Each listed layer's weight gradient reads a given tensor (``{id(layer): a}``, ``a`` shaped like its input)."""

    def __init__(self, activations: dict[int, Tensor]):
        self.activations = activations

    def saved_activation(self, layer, x):
        a = self.activations.get(id(layer))
        return SavedActivation(a) if a is not None else None


class _Active:
    """What feedback layers read while a rule's forward runs: plain attributes of one module-level
    object, not ``ContextVar``s, so that ``torch.compile`` traces a layer's lookup (an attribute read
    it guards on) instead of breaking the graph at every layer. A forward runs in one thread."""

    policy: FeedbackPolicy | None = None
    observers: tuple[Callable[[nn.Module, Tensor], None], ...] = ()


_ACTIVE = _Active()


def active_policy() -> FeedbackPolicy | None:
    """The policy feedback layers read now (None outside a rule's forward)."""
    return _ACTIVE.policy


@contextmanager
def feedback_policy(policy: FeedbackPolicy) -> Iterator[FeedbackPolicy]:
    """Feedback layers that run inside read ``policy`` (see :class:`FeedbackPolicy`)."""
    outer, _ACTIVE.policy = _ACTIVE.policy, policy
    try:
        yield policy
    finally:
        _ACTIVE.policy = outer


@contextmanager
def observe_weight_inputs(callback: Callable[[nn.Module, Tensor], None]) -> Iterator[None]:
    """``callback(layer, a)`` for every feedback layer that runs inside: ``a`` is the tensor its weight
    gradient will read (the memory model counts these)."""
    outer = _ACTIVE.observers
    _ACTIVE.observers = (*outer, callback)
    try:
        yield
    finally:
        _ACTIVE.observers = outer


class FeedbackLayer(nn.Module):
    """Mixin of the feedback twins: the buffer ``B`` (``feedback``) and a forward through a Function.

    A layer becomes its twin in place (:func:`attach_feedback`): its class changes to a subclass of
    both this mixin and its own class, so it stays an ``nn.Linear``/``nn.Conv2d`` (``isinstance``
    holds, its Parameters, hooks and state-dict keys ``weight``/``bias`` are untouched) and gains the
    key ``feedback``. Without grad recording the layer's own forward runs.
    """

    feedback: Tensor
    _fn: type[torch.autograd.Function]
    _plain_class: type[nn.Module]  # the class it had

    def _fn_args(self) -> tuple:
        return ()  # the Function's arguments after ``a`` (the conv geometry)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        policy = _ACTIVE.policy
        saved = policy.saved_activation(self, x) if policy is not None else None
        for observe in _ACTIVE.observers:
            observe(self, x if saved is None else saved.a)
        if saved is None:
            return self._fn.apply(x, self.weight, self.bias, self.feedback, None, *self._fn_args())
        return self._fn.apply(x, self.weight, self.bias, self.feedback, saved.a, *self._fn_args(), saved.a_map,
                              saved.feeds_B_only)


class FeedbackLinear(FeedbackLayer, nn.Linear):
    """An ``nn.Linear`` whose backward sends the error through ``B`` (keys ``weight``, ``bias``, ``feedback``)."""

    _fn = LinearFeedbackFn

    def extra_repr(self) -> str:
        return super().extra_repr() + ", feedback=B"


class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    """An ``nn.Conv2d`` whose backward sends the error through the kernel ``B``."""

    _fn = Conv2dFeedbackFn

    @property
    def conv(self) -> tuple:
        return (self.stride, self.padding, self.dilation, self.groups)

    def _fn_args(self) -> tuple:
        return self.conv

    def extra_repr(self) -> str:
        return super().extra_repr() + ", feedback=B"


_TWINS: dict[type, type] = {nn.Linear: FeedbackLinear, nn.Conv2d: FeedbackConv2d}


def _twin_class(cls: type) -> type:
    """The feedback twin of ``cls`` (a subclass of both; a user's Linear subclass gets its own)."""
    if cls not in _TWINS:
        base = FeedbackLinear if issubclass(cls, nn.Linear) else FeedbackConv2d
        _TWINS[cls] = type(f"Feedback{cls.__name__}", (base, cls), {"__module__": cls.__module__})
    return _TWINS[cls]


def make_feedback_layer(layer: nn.Module, feedback: Tensor) -> FeedbackLayer:
    """Turn ``layer`` (an ``nn.Linear``/``nn.Conv2d``) into its feedback twin, in place; ``B`` is copied."""
    if isinstance(layer, FeedbackLayer):
        raise ValueError(f"{type(layer).__name__} already has feedback weights")
    if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        raise ValueError("feedback Conv2d supports numeric zero padding only; "
                         f"got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
    plain = type(layer)
    layer.__class__ = _twin_class(plain)
    layer._plain_class = plain
    layer.register_buffer("feedback", feedback.detach().clone().contiguous())
    return layer


def attach_feedback(model: nn.Module, make_feedback: Callable[[nn.Module], Tensor]) -> list[FeedbackLayer]:
    """Turn every ``nn.Linear``/``nn.Conv2d`` in ``model`` (``model`` itself too) into its feedback twin, in place.

    ``make_feedback(layer)`` returns the initial ``B`` (shape of ``layer.weight``); it is copied,
    so ``B`` never aliases ``W``. Returns the layers in definition order.
    """
    swapped = [make_feedback_layer(m, make_feedback(m)) for m in list(model.modules())
               if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, FeedbackLayer)]
    if not swapped:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer to give feedback weights")
    return swapped


def fixed_feedback_linear(in_features: int, out_features: int, bound: float = 1.0) -> FeedbackLinear:
    """A Linear that is FA whatever rule trains it: ``B ~ U(-bound, bound)``, a buffer no rule updates.

    Rules give feedback only to plain layers (:func:`attach_feedback` skips this one), so its ``B``
    stays as drawn (from the global RNG) under KP, ASAP or BP alike. The ASAP authors' classifier
    (``Linear_FA`` in their ``code/resnet.py``) is this layer with ``bound = 1``.
    """
    layer = nn.Linear(in_features, out_features)
    return make_feedback_layer(layer, torch.empty_like(layer.weight).uniform_(-bound, bound))


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
def kp_decay_(layers: list[FeedbackLayer], decay: float | Tensor) -> None:
    """Kolen-Pollack decay: add ``decay * p`` to the ``.grad`` (where there is one) of every layer's
    ``W`` and ``B``, the same L2 decay on both, so ``W - B`` shrinks. Nothing when ``decay`` is 0."""
    if not torch.is_tensor(decay) and not decay:
        return
    with torch.no_grad():
        pairs = [(p.grad, p) for layer in layers for p in (layer.weight, layer.feedback) if p.grad is not None]
        if not pairs:
            return
        grads, params = map(list, zip(*pairs))
        if torch.is_tensor(decay):  # times a loss scale held on the device (fp16): no host sync
            torch._foreach_add_(grads, torch._foreach_mul(params, decay))
        else:  # one multi-tensor kernel, not two small ones per layer
            torch._foreach_add_(grads, params, alpha=decay)

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
    # B's own precision, also when the step ran under autocast (the mirror follows its backward)
    with torch.autocast(W.device.type, enabled=False):
        if isinstance(layer, FeedbackLinear):
            x = torch.randn(n, W.shape[1], dtype=W.dtype, device=W.device).mul_(std)  # (n, in)
            return (x @ W.T).T @ x / n  # y: (n, out); y^T x: (out, in)
        _, _, dilation, groups = layer.conv
        extent = [d * (k - 1) + 1 for d, k in zip(dilation, W.shape[2:])]
        x = torch.randn(n, W.shape[1] * groups, *extent, dtype=W.dtype, device=W.device).mul_(std)
        y = F.conv2d(x, W, None, 1, 0, dilation, groups)  # (n, out, 1, 1)
        return torch.nn.grad.conv2d_weight(x, W.shape, y, 1, 0, dilation, groups) / n


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` as plain PyTorch layers: every feedback layer back to the class it had
    (``B`` dropped), every compact activation module (``MaskReLU`` ...) back to its PyTorch class.

    The copy holds copies of the weights (``requires_grad`` as in ``model``) and back-propagates
    with ``W``: plain BP on the same network (the alignment tool's reference), and its
    ``state_dict`` loads strictly into a freshly built model. ``model`` itself is untouched;
    gradients already in ``.grad`` are not copied.
    """
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:  # deepcopy would copy every .grad too: memory the copy has no use for
        p.grad = None
    try:
        twin = copy.deepcopy(model)
    finally:
        for p, g in grads.items():
            p.grad = g
    for m in twin.modules():
        plain = getattr(m, "_plain_class", None)
        if plain is None:
            continue
        if isinstance(m, FeedbackLayer):
            del m.feedback  # a buffer, or a Parameter (Kolen-Pollack)
        m.__class__ = plain
        m.__dict__.pop("_plain_class", None)  # set per layer by make_feedback_layer
    return twin
