"""Activation sharing (Woo 2023, ch. 4): the weight gradient of a layer reads a *shared* activation.

Key: the layers that learn (all but the frozen first, Sec. 5.1.1) form a chain of *slots* (layers
reading the same input), grouped ``k`` at a time (the thesis's block size K); every layer of group
``m+1`` computes its weight gradient from ``h~_{m+1} = h_{m,K-1}``, the input of the previous group's
last slot (Algorithm 1 line 8; the default ``reading="thesis"``), and group 1 from the input of its
own first slot (the frozen layer's output). ``reading="group-input"`` is this library's earlier
reading (each group reads its own first slot's input). ``delta`` is the error at a layer's output;
``B`` has the shape of ``W`` (``B = W`` is BP, see mechanisms/feedback.py). docs/rules.md has the
plan per model and the measured effect of the reading.

References: Woo 2023, "Biologically Plausible Learning Algorithm without Weight Transport and
Bidirectional Connection" (M.Eng. thesis, SNU), ch. 4, Sec. 5.1.1, 5.2.1, 5.2.4 and Algorithm 1.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..mechanisms.compact import compact_activations
from ..mechanisms.feedback import (
    FeedbackPolicy,
    SavedActivation,
    attach_feedback,
    feedback_policy,
    kp_decay_,
    learn_feedback,
    random_like_init,
)
from ..mechanisms.local import LinearLocal, freeze
from ..mechanisms.modes import eval_mode, probe_batch
from ..registry import register_rule
from .base import placement, resolve_input_shape
from .fa import FA
from .kolen_pollack import KolenPollack
from .local_classifier import LocalClassifier

#: section 5.2.1's three ways to give the shared activation the shape of a layer's input
MATCH = {1: "max", 2: "avg", 3: "random", "max": "max", "avg": "avg", "random": "random"}


def match_activation(h: Tensor, shape: tuple[int, ...], method: str, C: Tensor | None = None,
                     conv: bool | None = None) -> Tensor:
    """``h`` (N, *shared) reshaped to (N, *shape), the input shape of the layer that uses it (Sec. 5.2.1).

    ``"max"``/``"avg"`` (methods 1/2): copies of ``h`` concatenated along channels (cut to the layer's
    channel count) and max-/average-pooled (adaptive) to its map size. A flat target (a Linear layer)
    takes the flattened ``h``, tiled when shorter and adaptively pooled over features when longer.
    ``"random"`` (method 3, Forward Alignment's fixed ``C``): a fixed random 1x1 convolution to the
    channel count, then average pooling to the map size; for a flat target ``C @ flatten(h)``.
    A Linear layer on tokens (``shape`` (T, D), ``h`` (N, T, D_s); ``conv=False``) matches each
    token's features alone, as a flat target of size D. ``conv``: the target is a Conv2d input
    (default: ``shape`` has 3 dims).
    """
    if tuple(h.shape[1:]) == tuple(shape):
        return h
    n = h.shape[0]
    conv = len(shape) == 3 if conv is None else conv
    if not conv and len(shape) > 1:  # a Linear on tokens: features matched token by token
        flat = match_activation(h.reshape(-1, h.shape[-1]), shape[-1:], method, C, conv=False)
        return flat.view(n, *shape)
    if conv:
        if h.ndim != 4:
            raise ValueError(f"cannot share a flat activation {tuple(h.shape[1:])} with a conv input {shape}")
        c, hw = shape[0], shape[1:]
        if method == "random":
            return F.adaptive_avg_pool2d(F.conv2d(h, C[:, :, None, None]), hw)  # C: (c, C_s)
        pool = F.adaptive_max_pool2d if method == "max" else F.adaptive_avg_pool2d
        h = pool(h, hw)  # pooling each channel first: the same result, on fewer copies
        return h.repeat(1, math.ceil(c / h.shape[1]), 1, 1)[:, :c]
    (d,) = shape
    h = h.reshape(n, -1)  # (N, S)
    if method == "random":
        return h @ C.T  # C: (d, S)
    if h.shape[1] < d:
        return h.repeat(1, math.ceil(d / h.shape[1]))[:, :d]
    pool = F.adaptive_max_pool1d if method == "max" else F.adaptive_avg_pool1d
    return pool(h[:, None], d)[:, 0]


#: which activation a group's layers read: the thesis's (Alg. 1 line 8: the input of the previous
#: group's last layer) or this library's earlier reading (the input of the group's own first layer)
READINGS = ("thesis", "group-input")


class PlanRow(NamedTuple):
    """What one layer's weight gradient reads in a step (``SharedActivations.sharing_plan``)."""

    layer: str  # module name in the model
    group: int | None  # sharing group m (None: not in one)
    reads: str  # "frozen", "own input", or "input of <layer>"
    input_shape: tuple[int, ...]  # the layer's own input, per sample
    shared_shape: tuple[int, ...] | None  # the activation it reads instead, per sample
    match: str | None  # how the shared activation is brought to the input's shape (None: no need)
    feeds: str  # which gradients read it: "W and B", "B" (ASFP), "W" (AS), "-"


class SharedActivations:
    """Mixin for feedback-layer rules: groups of ``k`` layers update from one shared activation.

    Key (Algorithm 1): the layers that learn (all but the frozen first, Sec. 5.1.1) form a chain of
    *slots* in forward order (a slot: the layers that read the same input; one layer, or a residual
    block's conv1 with its 1x1 shortcut conv); slots are grouped ``k`` at a time. Every layer of group
    ``m+1`` updates from ``h~_{m+1} = h_{m,K-1}`` (line 8), the *input of the previous group's last
    slot*, and group 1 from the input of its own first slot (with the first layer frozen, the output
    of that layer: how the authors' code reconciles Sec. 5.1.1 with line 2). So with k = 2,
    ``grad W_{l+2} = delta_{l+2} h_l^T`` and ``grad W_{l+3} = delta_{l+3} h_l^T`` (eqs. 4.3-4.6).

    A model may describe its own layout (``models/resnet.py`` does, after eqs. 5.1-5.3): a module
    attribute ``sharing_slots`` (names of its layers per slot, in data-flow order), and on the model
    ``activation_sharing = {"first_group": n, "own_input": [names]}``: the first group's size in
    slots (ResNets: 1, so that every later group is {conv2 of block j-1, conv1 and shortcut of block
    j} and reads block j-1's input ``x_{j-1}``, eq. 5.3) and the layers that read their own input
    (the classifier, as in the authors' code). Without them, every layer that runs is its own slot,
    in forward order, and the first group has ``k`` slots. ``sharing_plan()`` prints the result.

    Args:
        k: slots per group (the thesis's block size K).
        match: ``1``/``"max"``, ``2``/``"avg"`` or ``3``/``"random"`` (Sec. 5.2.1's methods), wherever
            the shared activation's shape differs from the layer's input.
        reading: ``"thesis"`` (default, above) or ``"group-input"``: every layer of a group reads the
            input of the group's own first slot, so that slot learns from its true input (a departure:
            at init its gradient equals KP's; docs/rules.md has the measured difference).
        train_first: False (the thesis, Sec. 5.1.1): the first layer is frozen (not trained); True
            trains it as the first layer of the first group.
        saved_norm: what BatchNorm keeps for backward: ``"input"`` (PyTorch's own),
            ``"normalized"`` (``x_hat``, exact, the same bytes) or ``"bfloat16"`` (``x_hat``
            rounded: half the bytes, lossy in the backward pass only; see mechanisms/compact.py).
        input_shape: per-sample input shape, to size the matching (default: the model's).

    Unless the shared activation feeds only ``B`` (ASFP, whose ``W`` still reads every layer's
    input), ReLUs keep boolean masks: with the next layer saving ``h~_m`` instead of the ReLU's
    output, the float output would otherwise stay alive for the ReLU's backward alone.
    """

    #: True (ASFP): the shared activation feeds only B's gradient; W learns from its own input
    shared_feeds_B_only = False
    #: the base rule takes ``input_shape`` too (a direct rule)
    base_takes_input_shape = False

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy", *, k: int = 2,
                 match: int | str = 1, reading: str = "thesis", train_first: bool = False, saved_norm: str = "input",
                 input_shape=None, **options):
        input_shape = resolve_input_shape(model, input_shape)  # before Linear layers become feedback layers
        if self.base_takes_input_shape:
            options["input_shape"] = input_shape
        super().__init__(model, num_classes, loss, **options)
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if match not in MATCH:
            raise ValueError(f"unknown match {match!r}; available: 1 (max), 2 (avg), 3 (random)")
        if reading not in READINGS:
            raise ValueError(f"unknown reading {reading!r}; available: {', '.join(READINGS)}")
        self.k, self.match, self.reading, self.train_first = k, MATCH[match], reading, train_first
        rule = type(self).__name__
        shapes, calls = _input_shapes(model, self.layers, input_shape)
        ordered = _forward_order(model, self.layers, calls, k > 1 or reading == "thesis", rule)
        self._first = ordered[0]
        if not train_first:  # Sec. 5.1.1: "do not train this layer"
            for p in (self._first.weight, self._first.bias, self._first.feedback):
                if p is not None and isinstance(p, nn.Parameter):
                    p.requires_grad_(False)
        hints = dict(getattr(model, "activation_sharing", None) or {})
        own = {id(model.get_submodule(n)) for n in hints.get("own_input", ())}
        self._sharing = [m for m in (ordered if train_first else ordered[1:]) if id(m) not in own]
        slots = _slots(model, self._sharing)  # slot index of each layer in _sharing
        first_group = hints.get("first_group") or k
        group = [0 if s < first_group else 1 + (s - first_group) // k for s in range(max(slots, default=-1) + 1)]
        last_slot = {g: s for s, g in enumerate(group)}  # each group's last slot
        first_slot = {g: s for s, g in reversed(list(enumerate(group)))}
        self._slot, self._group = slots, [group[s] for s in slots]
        self._source = [(first_slot[0] if g == 0 else last_slot[g - 1]) if reading == "thesis" else first_slot[g]
                        for g in self._group]  # per layer: the slot whose input it reads
        slot_input = {s: shapes[id(m)] for m, s in reversed(list(zip(self._sharing, slots)))}
        self._shapes: list[tuple[tuple[int, ...], tuple[int, ...], bool]] = []  # per layer: source, target, conv
        for j, layer in enumerate(self._sharing):
            source, target, conv = slot_input[self._source[j]], shapes[id(layer)], isinstance(layer, nn.Conv2d)
            self._shapes.append((source, target, conv))
            if self._source[j] == self._slot[j]:
                continue  # its own input
            _check_shareable(source, target, conv, model, layer, rule)
            if self.match == "random" and target != source:
                rows = target[0] if conv else target[-1]
                cols = source[0] if conv else source[-1] if len(target) > 1 else math.prod(source)
                C = torch.randn(rows, cols, **placement(model)) / math.sqrt(cols)  # FA's fixed C
                self.register_buffer(f"match{j}", C)
        self._input_shapes = shapes
        compact_activations(model, relu_mask=not self.shared_feeds_B_only, saved_norm=saved_norm)

    def forward_context(self, x=None):
        return feedback_policy(SharingPolicy(self))

    def sharing_plan(self) -> list[PlanRow]:
        """Every feedback layer, in forward order: which activation its weight (and B) gradient reads."""
        names = {id(m): n for n, m in self.model.named_modules()}
        by_slot = {}
        for m, s in zip(self._sharing, self._slot):
            by_slot.setdefault(s, m)
        position = {id(m): j for j, m in enumerate(self._sharing)}
        rows = []
        ran = {key: i for i, key in enumerate(self._input_shapes)}  # probe order; layers that never ran last
        for layer in sorted(self.layers, key=lambda m: ran.get(id(m), len(ran))):
            shape = self._input_shapes.get(id(layer), ())
            j = position.get(id(layer))
            if j is None:
                reads = "frozen (Sec. 5.1.1)" if layer is self._first and not self.train_first else "own input"
                rows.append(PlanRow(names[id(layer)], None, reads, shape, None, None, "-" if "frozen" in reads
                                    else "W and B" if layer.feedback.requires_grad else "W"))
                continue
            source, target, _ = self._shapes[j]
            own = self._source[j] == self._slot[j]
            feeds = "B" if self.shared_feeds_B_only else "W and B" if layer.feedback.requires_grad else "W"
            rows.append(PlanRow(names[id(layer)], self._group[j] + 1,
                                "own input" if own else f"input of {names[id(by_slot[self._source[j]])]}", target,
                                None if own else source, None if own or source == target else self.match, feeds))
        return rows

    def pipeline_cuts(self) -> set[int]:
        """Direct bases (ASFP-LC): a stage may not end between a shared activation's source and a layer
        that reads it (one process holds both, so ``h~_m`` never crosses a boundary)."""
        cuts = super().pipeline_cuts()
        unit_of = {id(m): i for i in range(self.num_units()) for u in self.unit_modules(i) for m in u.modules()}
        slot_unit = {s: unit_of[id(m)] for m, s in zip(self._sharing, self._slot)}
        for j, layer in enumerate(self._sharing):
            a, b = sorted((slot_unit[self._source[j]], unit_of[id(layer)]))
            cuts -= set(range(a + 1, b + 1))
        return cuts


def group_end_blocks(model: nn.Sequential, num_classes: int, loss: str, options: dict) -> list[str] | None:
    """The names of ``model``'s hidden children that hold the last layer of a sharing group (the
    groups ``asfp`` forms with these options, on a copy), in order; None if that is every one."""
    takes = {n for n, p in inspect.signature(SharedActivations.__init__).parameters.items()
             if p.kind is p.KEYWORD_ONLY}
    sharing = {k: v for k, v in options.items() if k in takes}
    with torch.random.fork_rng(devices=[]):  # the copy's random B must not move the rule's own draws
        twin = ASFP(copy.deepcopy(model), num_classes, loss, **sharing)
    children = list(twin.model.named_children())
    child_of = {id(m): i for i, (_, child) in enumerate(children) for m in child.modules()}
    last: dict[int, int] = {}
    for layer, group in zip(twin._sharing, twin._group):
        last[group] = max(last.get(group, -1), child_of[id(layer)])
    ends = sorted(set(last.values()) - {len(children) - 1})
    if not ends:
        raise ValueError("classifiers='group': every sharing group ends in the head, so there is no hidden block to "
                         "end with a local classifier; use a smaller k or classifiers='block'")
    if ends == list(range(len(children) - 1)):
        return None
    return [children[i][0] for i in ends]


def format_plan(rows: list[PlanRow]) -> str:
    """The plan as a markdown table."""
    from ..report import markdown_table

    def shape(s):
        return "x".join(map(str, s)) if s else "-"

    return "\n".join(markdown_table(
        ["layer", "group", "weight gradient reads", "input", "shared", "match", "trains"],
        [[r.layer, r.group or "-", r.reads, shape(r.input_shape), shape(r.shared_shape), r.match or "-", r.feeds]
         for r in rows])) + "\n"


def _slots(model: nn.Module, layers: list[nn.Module]) -> list[int]:
    """The slot index of each layer (in forward order): a module's ``sharing_slots`` (names of its
    layers per slot) puts its layers together; any other layer is a slot of its own."""
    owner: dict[int, tuple[int, int]] = {}
    for m in model.modules():
        for i, names in enumerate(getattr(m, "sharing_slots", ()) or ()):
            for name in names:
                try:
                    owner[id(m.get_submodule(name))] = (id(m), i)
                except AttributeError:
                    pass  # an optional layer (an identity shortcut has no conv)
    index: dict[object, int] = {}
    return [index.setdefault(owner.get(id(layer), id(layer)), len(index)) for layer in layers]


class SharingPolicy(FeedbackPolicy):
    """One step of activation sharing: a source slot's first layer records its input; every layer saves,
    for its weight gradient, the input of its group's source slot, matched to its own input in backward."""

    def __init__(self, rule: SharedActivations):
        self.rule = rule
        self.position = {id(layer): j for j, layer in enumerate(rule._sharing)}  # this copy's layers
        self.sources = set(rule._source)
        self.shared: dict[int, Tensor] = {}  # slot -> its input, for this forward only

    def saved_activation(self, layer, x):
        j = self.position.get(id(layer))
        if j is None:  # the frozen first layer, or a layer that reads its own input
            return None
        rule, slot = self.rule, self.rule._slot[j]
        if slot in self.sources:
            self.shared.setdefault(slot, x)  # the slot's first layer to run records it
        if rule._source[j] == slot:
            return None  # its own input (saving x itself keeps no extra tensor)
        source, target, conv = rule._shapes[j]
        C = getattr(rule, f"match{j}", None)
        return SavedActivation(self.shared[rule._source[j]],
                               functools.partial(match_activation, shape=target, method=rule.match, C=C, conv=conv),
                               rule.shared_feeds_B_only)


def _forward_order(model: nn.Module, layers, calls: list[int], shares: bool, rule: str) -> list[nn.Module]:
    """The layers that run, in the order they first run; with ``k > 1``, each must run exactly once.

    Where sharing applies: a group's later layers read the input of the group's first layer, so the
    plan needs one forward order of single calls. Chains, residual networks (the shortcut conv runs
    as one more layer) and transformers (qkv, proj, fc1, fc2 per block) have one; a layer run twice
    per forward (shared weights, recurrence) has none, and needs ``k = 1`` (each layer its own input).
    """
    names = {id(m): n for n, m in model.named_modules()}
    if shares:
        for layer in layers:
            if calls.count(id(layer)) > 1:
                raise ValueError(f"{rule} shares activations along the order layers run in; "
                                 f"{names.get(id(layer), '?')!r} runs {calls.count(id(layer))} times per forward: "
                                 "use k=1 with reading='group-input', or a model whose Linear/Conv2d layers run once each")
    first: dict[int, int] = {}
    for c in calls:
        first.setdefault(c, len(first))
    ran = sorted((m for m in layers if id(m) in first), key=lambda m: first[id(m)])
    if not ran:
        raise ValueError(f"{rule}: no Linear/Conv2d layer ran in the model's forward pass")
    return ran


def _check_shareable(source, target, conv: bool, model: nn.Module, layer: nn.Module, rule: str) -> None:
    """Sec. 5.2.1's matching covers conv inputs from conv activations, flat inputs from any, and
    tokens (T, D) from tokens with the same T; anything else is an error at construction."""
    if source == target or (not conv and len(target) == 1) or (conv and len(source) == 3) or (
            not conv and len(target) > 1 and len(source) == len(target) and source[:-1] == target[:-1]):
        return
    name = dict((id(m), n) for n, m in model.named_modules()).get(id(layer), "?")
    raise ValueError(f"{rule} cannot share an activation of shape {tuple(source)} with {name!r} (input "
                     f"{tuple(target)}); use k=1 (each layer learns from its own input)")


@torch.no_grad()
def _input_shapes(model: nn.Module, layers, input_shape) -> tuple[dict[int, tuple[int, ...]], list[int]]:
    """Per-sample input shape of every layer and the order of their calls (ids), from one 2-sample
    probe in eval mode."""
    shapes: dict[int, tuple[int, ...]] = {}
    calls: list[int] = []

    def record(m, a):
        shapes[id(m)] = tuple(a[0].shape[1:])
        calls.append(id(m))

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        with eval_mode(model):
            model(probe_batch(model, input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes, calls


@register_rule("as", summary="activation sharing: k layers update from one shared activation, BP's feedback W",
               paper="Woo 2023 (thesis), Sec. 4.1")
class AS(SharedActivations, FA):
    """Activation Sharing with symmetric paths (Sec. 4.1, eqs. 4.1-4.4; Fig. 4.2).

    1. ``B <- W`` before every step (a copy: this rule *does* transport weights, as the thesis says).
    2. Forward; every layer of group ``m`` keeps only the shared ``h~_m`` (module docstring).
    3. Backward as BP: ``delta_{m,k-1} = phi' B_{m,k}^T delta_{m,k}``.
    4. ``grad W_{m,k} = delta_{m,k} h~_m^T`` (gradient descent on the loss; the optimizer subtracts).
    """

    mutable_buffers = ("feedback",)  # B tracks W by design

    def before_step(self):
        super().before_step()
        with torch.no_grad():  # one multi-tensor kernel for every layer's B <- W
            torch._foreach_copy_([layer.feedback for layer in self.layers], [layer.weight for layer in self.layers])


@register_rule("asap", summary="activation sharing with asymmetric paths: shared h~ updates W and B alike (KP)",
               paper="Woo 2023 (thesis), Sec. 4.2, Alg. 1")
class ASAP(SharedActivations, KolenPollack):
    """Activation Sharing with Asymmetric Paths (Sec. 4.2.1, eqs. 4.5-4.6; Algorithm 1).

    1. Every Linear/Conv2d gets a random trainable ``B`` (never aliasing ``W``: its own Parameter).
    2. Forward; every layer of group ``m+1`` keeps ``h~_{m+1} = h_{m,K-1}`` (Alg. 1 line 8, lines 2-9).
    3. Backward through ``B``: ``delta_{m,k-1} = phi' B_{m,k}^T delta_{m,k}`` (line 17).
    4. ``grad W_{m,k} = grad B_{m,k} = delta_{m,k} h~_m^T + lambda (W or B)`` (lines 25-26, as KP).

    Lines 25-26 add ``delta h~^T`` (with ``delta = y - y*``, line 14), which ascends the loss; we
    descend: the rule fills ``.grad`` and the optimizer subtracts. The authors' code (a held-out port)
    gives the same conv gradients bit for bit at k = 2 and 4 (docs/rules.md).
    The activation is shared only for ``grad_weight``: only ``h~_m`` is saved for backward, and
    its shape is matched to each layer (``match``) inside the backward.
    """


@register_rule("asfp", summary="activation sharing in the feedback path: shared h~ updates B only; W from its input",
               paper="Woo 2023 (thesis), Sec. 4.3")
class ASFP(SharedActivations, KolenPollack):
    """Activation Sharing in the Feedback Path (Sec. 4.3, eqs. 4.7-4.10; Fig. 4.6).

    1. Every Linear/Conv2d gets a random trainable ``B`` (its own Parameter, never ``W``).
    2. Forward; every layer of group ``m`` keeps the shared ``h~_m``, as ASAP.
    3. Backward through ``B``: ``delta_{m,k-1} = phi' B_{m,k}^T delta_{m,k}``.
    4. ``grad W_{m,k} = delta_{m,k} h_{m,k-1}^T + lambda W`` (its own input, eqs. 4.7-4.8);
       ``grad B_{m,k} = delta_{m,k} h~_m^T + lambda B`` (the shared activation, eqs. 4.9-4.10).

    The thesis's prose after eq. 4.10 swaps "forward" and "feedback"; we follow the equations. Each
    layer saves its own input (for ``W``) and ``h~_m`` (for ``B``), so ASFP saves no memory over FA.
    """

    shared_feeds_B_only = True


class _LocalFA(LocalClassifier):
    """Cut blocks, each with a trained local classifier (2x2 average pool + FC) whose error reaches
    the block through a fixed random ``B_c`` (FA), not through the classifier's own weight; the
    model's layers are feedback layers with trained ``B`` and KP decay (as ``asfp``)."""

    per_block_modules = ("classifiers", "classifier_feedback")

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy", input_shape=None,
                 feedback_scale: float = 1.0, kp_decay: float = 1e-4, local_loss: str = "cross-entropy",
                 blocks=None):
        if not (feedback_scale > 0 and kp_decay >= 0):
            raise ValueError(f"need feedback_scale > 0 and kp_decay >= 0, got {feedback_scale}, {kp_decay}")
        # Feedback layers first: the direct rule keeps references to the blocks (a bare Linear head).
        layers = attach_feedback(model, lambda layer: random_like_init(layer, feedback_scale))
        super().__init__(model, num_classes, loss, input_shape, learn_classifier=True, local_loss=local_loss,
                         blocks=blocks)
        self.layers, self.kp_decay = layers, kp_decay
        # the thesis's 2x2 average pool, where the map has 2x2 to pool (a 1x1 map is used as it is)
        self.classifiers = nn.ModuleList(
            LinearLocal(s, num_classes, 2 if len(s) == 3 and min(s[1:]) >= 2 else 1)
            for s in self.hidden_output_shapes()).to(**placement(model))
        for layer in self.layers:
            learn_feedback(layer)
        self.classifier_feedback = nn.ModuleList(  # B_c: FA's fixed random twin of each classifier
            freeze(LinearLocal(A.shape, num_classes, A.pool)) for A in self.classifiers).to(**placement(model))

    def signals(self, e, target, outputs, blocks):
        # block i gets B_c^T e_i (FA through the classifier), e_i = dL_i/dz_i of its own classifier
        part = slice(blocks.start, blocks.stop)
        return [Bc.feedback(self.local_error.error(A(h.detach()), target)[1])
                for A, Bc, h in zip(self.classifiers[part], self.classifier_feedback[part], outputs)]

    def after_backward(self, scale):
        super().after_backward(scale)
        kp_decay_(self.layers, self.kp_decay * scale)  # as kp: the same L2 decay on W and B


@register_rule("asfp-lc", summary="asfp inside blocks cut apart, each trained by its own local classifier (FA)",
               paper="Woo 2023 (thesis), Sec. 5.2.4")
class ASFPLC(SharedActivations, _LocalFA):
    """ASFP with a Local Classifier (Sec. 5.2.4; Mostafa et al. 2018 for the classifier).

    1. Every block input is cut; hidden block ``i`` ends in a local classifier
       ``z_i = A_i avgpool_2x2(h_i)`` (``A_i`` trained on ``L_i = CE(softmax(z_i), y*)``).
    2. The classifier is trained by FA: block ``i`` receives ``B_{c,i}^T e_i`` at its output
       (``e_i = dL_i/dz_i``, ``B_{c,i}`` fixed random), not ``A_i^T e_i``.
    3. Inside each block the error goes down as ``asfp``: through trained ``B``; ``grad W`` from the
       layer's own input, ``grad B`` from the shared activation ``h~_m``; KP decay on both.
    4. The head learns from the global loss, as BP.

    Where the classifiers sit (``classifiers``): the thesis places one "at the end of the ASFP
    block" (Sec. 5.2.4), its name for a sharing group (Algorithm 1's block m of K layers).
    ``"group"``: a classifier follows the model block that holds each group's last layer, and the
    blocks between two classifiers form one cut unit (``blocks`` naming those children). On the
    thesis's ResNet plan at k = 2 that is every residual block (group {conv2 of block j-1, conv1 of
    block j} ends in block j), at k = 4 every other block; the frozen stem joins the first unit.
    ``"block"`` (default) puts one after every hidden block of the model: at k = 2 on a ResNet the
    same places plus one after the frozen stem. It is the default because it pipelines: under the
    thesis's reading group m+1 reads an activation of group m, so with one unit per group every
    unit shares an activation with the next and no stage boundary is allowed (docs/rules.md has
    both measured). A group may span a cut (eq. 5.3's groups straddle residual blocks); ``h~_m``
    then feeds only weight gradients and never carries an error across it. ``blocks=[child
    names]`` places the classifiers by hand.
    """

    shared_feeds_B_only = True
    base_takes_input_shape = True

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy", *,
                 classifiers: str = "block", blocks=None, **options):
        if classifiers not in ("group", "block"):
            raise ValueError(f"unknown classifiers {classifiers!r}; available: group (one per sharing group, "
                             "the thesis), block (one per hidden block)")
        if blocks is None and classifiers == "group" and isinstance(model, nn.Sequential):
            blocks = group_end_blocks(model, num_classes, loss, options)
        super().__init__(model, num_classes, loss, blocks=blocks, **options)
