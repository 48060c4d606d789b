"""Associated Learning networks: a deep network folded into components (Kao & Chen 2021, Sec. 4).

Component ``i`` (1..L) holds four functions; symbols as in the paper (Figs. 2-4)::

    x = s_0 -f_1-> s_1 -f_2-> ... -f_L-> s_L          encoders (the "associated functions")
                    |b_1          |b_L                bridges: s'_i = b_i(s_i) ~ t_i
    y = t_0 -g_1-> t_1 -g_2-> ... -g_L-> t_L          label encoders (training only)
        t_0 <-h_1- t_1 <-h_2- ... <-h_L- t_L          decoders

    associated loss  ||b_i(s_i) - t_i||^2         (eq. 4.3): trains f_i, b_i
    autoencoder loss ||h_i(g_i(t_{i-1})) - t_{i-1}||^2 (eq. 4.6): trains g_i, h_i
    inference        y_hat = h_1 o ... o h_L o b_L o f_L o ... o f_1 (x)  (eq. 4.8)

A :class:`Component` computes its two losses from inputs it cuts from the graph itself, so it
can run alone (one process per component, issue 7). :class:`AssociatedNet` is the stack; its
``forward`` is the inference path, which uses only the *effective* parameters (every f_i and h_i,
and b_L); ``inference_model()`` is that path as a standalone :class:`BlockNet`.

:func:`fold` builds an AssociatedNet from a list of encoder units (the layers of f_1..f_L);
:func:`unfold` builds the *matched* BP network from the same units: f_1..f_L, a copy of the
last bridge and of h_L..h_2 with the BP activation, and a linear head in place of h_1. Its
parameters have the same shapes as the AL inference network's, which is the fair comparison
of the paper's Sec. 5.1 ("we increased the number of layers ... so that the models trained by
AL and those trained by BP have identical parameters").

Defaults (He-normal weights and zero biases, ELU encoders, sigmoid bridges and label side,
bridge hidden width 5 x t_i) follow Sec. 5.1 and the authors' code
(github.com/SamYWK/Associated_Learning); docs/rules.md lists every choice the paper leaves open.

References: Kao & Chen 2021, "Associated Learning: Decomposing End-to-End Backpropagation Based on
Autoencoders and Target Propagation", Neural Computation 33(1), Secs. 4-5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..mechanisms.modes import block_output_shapes
from ..registry import register_model
from .blocks import BlockNet, apply_init, parse_dims
from .blocks import activation as make_activation

REDUCTIONS = ("mean", "sum")


class ComponentOutput(NamedTuple):
    s: Tensor  # s_i = f_i(s_{i-1}): (N, ...) with graph to f_i
    t: Tensor  # t_i = g_i(t_{i-1}): (N, n_i) with graph to g_i
    bridge: Tensor  # s'_i = b_i(s_i): (N, n_i)
    assoc_loss: Tensor  # ||b_i(s_i) - t_i||^2, scalar
    ae_loss: Tensor  # ||h_i(t_i) - t_{i-1}||^2, scalar


def squared_error(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``"mean"``: over every element (the authors' ``tf.losses.mean_squared_error``);
    ``"sum"``: summed over features, averaged over the batch (the paper's ``||.||^2`` per sample)."""
    if reduction == "mean":
        return F.mse_loss(pred, target)
    return (pred - target).pow(2).sum() / pred.shape[0]


class Component(nn.Module):
    """One component of the folded network: encoder ``f``, bridge ``b``, label encoder ``g``, decoder ``h``."""

    def __init__(self, f: nn.Module, b: nn.Module, g: nn.Module, h: nn.Module):
        super().__init__()
        self.f, self.b, self.g, self.h = f, b, g, h

    def forward(self, s_prev: Tensor, t_prev: Tensor, reduction: str = "mean") -> ComponentOutput:
        """Both local losses, on inputs cut from the component below: no gradient leaves this component."""
        t_prev = t_prev.detach()
        s = self.f(s_prev.detach())
        t = self.g(t_prev)
        bridge = self.b(s)
        # t_i is the associated loss's target, not a path: that loss trains f_i and b_i only.
        assoc = squared_error(bridge, t.detach(), reduction)
        ae = squared_error(self.h(t), t_prev, reduction)
        return ComponentOutput(s, t, bridge, assoc, ae)


class AssociatedNet(nn.Module):
    """Components 1..L; ``forward(x)`` is the inference network of eq. 4.8.

    Args:
        components: in forward order.
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)``.
        num_classes: size of ``t_0`` (the one-hot label) and of the output.
    """

    #: a folded network: rules read this, never the class (only 'al', and BP end to end, train one)
    folded = True

    def __init__(self, components: Sequence[Component], input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if not components:
            raise ValueError("an AssociatedNet needs at least one component")
        self.components = nn.ModuleList(components)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self.components)

    # The four families of functions, in component order (views of the components' modules).
    @property
    def f(self) -> list[nn.Module]:
        return [c.f for c in self.components]

    @property
    def b(self) -> list[nn.Module]:
        return [c.b for c in self.components]

    @property
    def g(self) -> list[nn.Module]:
        return [c.g for c in self.components]

    @property
    def h(self) -> list[nn.Module]:
        return [c.h for c in self.components]

    def encode(self, x: Tensor) -> Tensor:
        """``s_L = f_L o ... o f_1 (x)``."""
        for f in self.f:
            x = f(x)
        return x

    def decode(self, t: Tensor) -> Tensor:
        """``h_1 o ... o h_L (t)``: from (an estimate of) ``t_L`` back to the label space."""
        for h in reversed(self.h):
            t = h(t)
        return t

    def forward(self, x: Tensor) -> Tensor:  # x: (N, *input_shape) -> (N, C); predict with argmax
        return self.decode(self.components[-1].b(self.encode(x)))

    def inference_model(self) -> BlockNet:
        """The effective network alone (f_1..f_L, b_L, h_L..h_1), sharing this net's modules.

        Its ``state_dict`` holds only the effective parameters; load it into the
        ``inference_model()`` of a freshly built twin to predict without the affiliated ones.
        """
        return BlockNet([*self.f, self.components[-1].b, *reversed(self.h)], self.input_shape)

    def metafeatures(self, x: Tensor) -> dict[str, Tensor]:
        """Every layer of the inference path, in forward order (Sec. 5.4's metafeatures).

        ``s1 .. sL`` (encoder outputs), ``bL.1 ..`` (hidden layers of the last bridge), ``bL``
        (the bridge output s'_L, the estimate of t_L), then ``h{L} .. h1`` (decoder outputs: the
        estimates of t_{L-1} .. t_1, and ``h1`` = the prediction). Runs in the current mode.
        """
        out: dict[str, Tensor] = {}
        L = len(self)
        for i, f in enumerate(self.f, 1):
            x = f(x)
            out[f"s{i}"] = x
        bridge = self.components[-1].b
        layers = list(bridge)
        x = layers[0](x)  # flatten (and pool): no parameters, not a layer of its own
        for j, layer in enumerate(layers[1:], 1):
            x = layer(x)
            out[f"b{L}" if j == len(layers) - 1 else f"b{L}.{j}"] = x
        for i, h in reversed(list(enumerate(self.h, 1))):
            x = h(x)
            out[f"h{i}"] = x
        return out

    def extra_repr(self) -> str:
        return f"components={len(self)}, input_shape={self.input_shape}, num_classes={self.num_classes}"


# --- building from encoder units -------------------------------------------------------------

def dense(d_in: int, d_out: int, act: str) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), make_activation(act))


def bridge(shape: torch.Size, n_out: int, hidden: Sequence[int], act: str, pool: int | None) -> nn.Sequential:
    """``[pool +] flatten``, then ``len(hidden)`` hidden dense layers and one to ``n_out``, all ``act``."""
    prep: list[nn.Module] = []
    if pool is not None and len(shape) == 3:
        # Pooling bounds the bridge of an early conv component: the authors flatten whole maps,
        # e.g. VGG's 256x16x16 s_1 feeds a 65536 x 1500 bridge (98M affiliated parameters).
        prep.append(nn.AdaptiveAvgPool2d(pool))
        shape = torch.Size((shape[0], min(pool, shape[1]), min(pool, shape[2])))
    prep.append(nn.Flatten())
    d = math.prod(shape)
    layers: list[nn.Module] = [nn.Sequential(*prep)]
    for width in [*hidden, n_out]:
        layers.append(dense(d, width, act))
        d = width
    return nn.Sequential(*layers)


def group_sizes(n_units: int, components: int | None, default: Sequence[int] | None) -> list[int]:
    """Units per component: ``default`` when ``components`` is not given, else an even split."""
    if components is None:
        return list(default) if default is not None else [1] * n_units
    if isinstance(components, bool) or not isinstance(components, int) or not 1 <= components <= n_units:
        raise ValueError(f"components must be an integer from 1 to {n_units} (the encoder's units), got {components!r}")
    q, r = divmod(n_units, components)
    return [q + (1 if i < r else 0) for i in range(components)]  # earlier components take the extra unit


def parse_widths(value, what: str) -> list[int]:
    if isinstance(value, str):
        return parse_dims(value, what)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, Sequence) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ValueError(f"bad {what} {value!r}; expected positive integers, e.g. 300-300 or [300, 300]")
    return list(value)


def positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


class Layout(NamedTuple):
    """What AL and its matched BP network share: encoders, s-shapes, t widths, bridge widths."""

    encoders: list[nn.Sequential]  # f_1..f_L
    s_shapes: list[torch.Size]
    widths: list[int]  # n_1..n_L: t_i sizes
    bridge_hidden: list[list[int]]  # hidden widths of b_i
    bridge_pool: int | None


def layout(units: Sequence[nn.Module], *, input_shape, num_classes: int, width: int, components=None,
           default_sizes=None, label_widths=None, bridge_depth: int = 1, bridge_width: int | None = None,
           bridge_pool: int | None = None) -> Layout:
    """Group encoder ``units`` into f_1..f_L and size every t_i and bridge (see :func:`fold`)."""
    positive_int(num_classes, "num_classes")
    positive_int(width, "width")
    positive_int(bridge_depth, "bridge_depth", minimum=0)
    if bridge_width is not None:
        positive_int(bridge_width, "bridge_width")
    if bridge_pool is not None:
        positive_int(bridge_pool, "bridge_pool")
    sizes = group_sizes(len(units), components, default_sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    encoders = [nn.Sequential(*units[a:a + n]) for a, n in zip(starts, sizes)]
    L = len(encoders)
    widths = [width] * L if label_widths is None else parse_widths(label_widths, "label_widths")
    if len(widths) != L:
        raise ValueError(f"label_widths needs one width per component ({L}), got {len(widths)}: {widths}")
    hidden = [[bridge_width or 5 * n] * bridge_depth for n in widths]  # 5 x n_i: the authors' 5120 for 1024
    return Layout(encoders, block_output_shapes(encoders, input_shape), widths, hidden, bridge_pool)


def fold(units: Sequence[nn.Module], *, input_shape, num_classes: int, width: int, components: int | None = None,
         default_sizes: Sequence[int] | None = None, label_widths=None, bridge_depth: int = 1,
         bridge_width: int | None = None, bridge_pool: int | None = None, bridge_activation: str = "sigmoid",
         label_activation: str = "sigmoid", init: str = "he-normal") -> AssociatedNet:
    """An :class:`AssociatedNet` whose encoders f_1..f_L are consecutive groups of ``units``.

    Args:
        units: encoder layers in forward order (built with the encoder activation).
        input_shape: ``(C, H, W)`` or ``(D,)`` of one sample.
        num_classes: C = size of t_0 (one-hot) and of the output.
        width: n_i, the size of every t_i unless ``label_widths`` is given.
        components: L; units are split evenly (earlier components take the extra units).
            Default: ``default_sizes`` (units per component), else one unit per component.
        label_widths: ``n_1-...-n_L`` (text or list), the t-side widths per component.
        bridge_depth: hidden layers per bridge (0: one dense layer s_i -> t_i).
        bridge_width: their width; default ``5 * n_i``.
        bridge_pool: adaptive-average-pool conv s_i to ``k x k`` before flattening (default: no pool).
        bridge_activation, label_activation: of every bridge layer, and of every g_i and h_i
            (h_1's output included, so the prediction lies in (0, 1) like the one-hot target).
        init: ``"he-normal"`` (the paper) or ``"torch"`` (PyTorch's defaults).
    """
    apply_init(nn.Identity(), init)  # an unknown init fails before anything is built
    make_activation(bridge_activation), make_activation(label_activation)  # typos fail here, by name
    lay = layout(units, input_shape=input_shape, num_classes=num_classes, width=width, components=components,
                 default_sizes=default_sizes, label_widths=label_widths, bridge_depth=bridge_depth,
                 bridge_width=bridge_width, bridge_pool=bridge_pool)
    below = [num_classes, *lay.widths[:-1]]  # t_{i-1} sizes
    comps = [Component(f, bridge(shape, n, hid, bridge_activation, lay.bridge_pool),
                       dense(n_prev, n, label_activation), dense(n, n_prev, label_activation))
             for f, shape, n, n_prev, hid in zip(lay.encoders, lay.s_shapes, lay.widths, below, lay.bridge_hidden)]
    net = AssociatedNet(comps, input_shape, num_classes)
    return apply_init(net, init)


def unfold(units: Sequence[nn.Module], *, input_shape, num_classes: int, width: int, components: int | None = None,
           default_sizes: Sequence[int] | None = None, label_widths=None, bridge_depth: int = 1,
           bridge_width: int | None = None, bridge_pool: int | None = None, activation: str = "relu",
           init: str = "he-normal") -> BlockNet:
    """The BP network matched to ``fold(units, ...)``: its inference path, trained end to end.

    Blocks: f_1..f_L, the last bridge, h_L..h_2 as dense layers (every one with ``activation``),
    and a linear head ``n_1 -> C`` in place of h_1 (logits for softmax cross-entropy). Every
    parameter has the shape of the matching effective parameter of the AL network.
    """
    apply_init(nn.Identity(), init)  # an unknown init fails before anything is built
    lay = layout(units, input_shape=input_shape, num_classes=num_classes, width=width, components=components,
                 default_sizes=default_sizes, label_widths=label_widths, bridge_depth=bridge_depth,
                 bridge_width=bridge_width, bridge_pool=bridge_pool)
    n = lay.widths
    blocks: list[nn.Module] = [*lay.encoders, bridge(lay.s_shapes[-1], n[-1], lay.bridge_hidden[-1], activation,
                                                     lay.bridge_pool)]
    blocks += [dense(n[i], n[i - 1], activation) for i in reversed(range(1, len(n)))]
    blocks.append(nn.Linear(n[0], num_classes))
    net = BlockNet(blocks, input_shape)
    return apply_init(net, init)


def flat_input(input_shape, num_classes, spec: str, default_hidden: Sequence[int]) -> tuple[tuple, list[int], int]:
    """``spec`` ``"784-1024-1024-10"`` (input, s widths, classes) checked against the dataset."""
    if input_shape is None:
        input_shape = (parse_dims(spec, "al-mlp sizes")[0],) if spec else (784,)
    d_in = math.prod(input_shape)
    dims = parse_dims(spec, "al-mlp sizes") if spec else [d_in, *default_hidden, num_classes or 10]
    if len(dims) < 3:
        raise ValueError(f"al-mlp needs an input, at least one component width and an output size, got {spec!r}")
    if dims[0] != d_in:
        raise ValueError(f"al-mlp input size {dims[0]} does not match input shape {tuple(input_shape)}: the data "
                         f"has {d_in} values a sample")
    if num_classes is not None and num_classes != dims[-1]:
        raise ValueError(f"al-mlp output size {dims[-1]} does not match the dataset's {num_classes} classes")
    return tuple(input_shape), dims[1:-1], dims[-1]


@register_model("al-mlp", summary="associated-learning MLP, e.g. al-mlp:784-1024-1024-10 (one component per width)",
                paper="Kao & Chen 2021, Sec. 5.2-5.3")
def al_mlp(spec: str = "", *, input_shape=None, num_classes: int | None = None, activation: str = "elu",
           width: int | None = None, label_widths=None, **options) -> AssociatedNet:
    """Component i: ``f_i`` = Linear + ELU to the i-th width; t_i as wide as s_i (the paper's 1024/1024)
    unless ``width`` (every t_i) or ``label_widths`` (each) is given.

    ``al-mlp:784-1024-1024-10`` is the paper's MNIST MLP (two components, bridge 5120 wide);
    more or fewer widths give the 1-3 component networks of Tables 5-6. Its matched BP network
    is ``mlp:784-1024-1024-5120-1024-1024-10``.
    """
    shape, hidden, classes = flat_input(input_shape, num_classes, spec, (1024, 1024))
    make_activation(activation)
    units = [nn.Sequential(*([nn.Flatten()] if i == 0 else []), nn.Linear(a, b), make_activation(activation))
             for i, (a, b) in enumerate(zip([math.prod(shape), *hidden[:-1]], hidden))]
    if label_widths is None and width is None:
        label_widths = hidden
    return fold(units, input_shape=shape, num_classes=classes, width=width or hidden[0],
                label_widths=label_widths, **options)
