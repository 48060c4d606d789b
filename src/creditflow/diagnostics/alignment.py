"""Gradient alignment: the signal each block received, beside BP's gradient for the same step.

For every hidden block i (each child of the model but the last, the head) we record the tensor
that arrives at the block's output ``h_i`` during the rule's backward pass:

* BP, FA and every feedback-layer rule: the gradient back-propagated from the layers above
  (for FA through ``B`` instead of ``W``);
* DFA, DRTP, LAS and every direct rule: the injected signal ``s_i`` (DFA: ``B_i e``), since the
  fused ``torch.autograd.backward([logits, h_1..h_k], [e, s_1..s_k])`` hands ``s_i`` to ``h_i``;
* nothing, for blocks the rule does not train (Shallow's frozen blocks): NaN.

The reference is ``dL/dh_i`` from plain BP on a copy of the same network (feedback layers turned
back into ``nn.Linear``/``nn.Conv2d``), on the same batch, weights, train/eval mode and random
state (dropout masks). Per sample n the cosine ``cos(s_i[n], dL/dh_i[n])`` is taken over the
flattened block output, then averaged over the batch (LAS paper, Fig. 4: "average ... for the
minibatches"). Samples where either vector is exactly zero have no angle and are left out of the
mean. The scale of a signal does not enter: only its direction.

Weight alignment: for every ``(B, reference)`` in ``rule.feedback_pairs()`` (FA: ``B`` vs ``W``;
DFA/LAS: ``B_i`` vs ``W_L ... W_{i+1}``) the angle ``arccos(cos(vec B, vec reference))`` in degrees.

``at="pre-activation"`` records one step further down instead: the gradient at the input of each
block's final activation, ``delta_i = s_i * f'(a_i)`` (the LAS paper's ``delta_1``, eq. 24, and its
Fig. 4), for blocks that end in an activation module. Mask-free it is the same direction as at the
output; with ReLU the inactive units drop out of both vectors.

Recording needs no help from the rule: a forward hook on each block (or on its final activation)
registers a tensor hook on its output (or the activation's input). References: Yang, Lee & Park
2024, Sec. IV.C and Fig. 4; Lillicrap et al. 2016, Fig. 2; Nøkland 2016, Sec. 5.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..mechanisms.feedback import plain_copy

__all__ = ["Alignment", "AlignmentProbe", "block_cosine", "measure", "weight_angles"]


@dataclass(frozen=True)
class Alignment:
    """One measurement on one batch.

    Attributes:
        block_cosine: per hidden block i (model children but the head, in order): the mean over
            samples of ``cos(signal_i, BP gradient_i)`` at the block output; NaN where the block
            received no signal (or BP sent none).
        weight_angle_deg: ``{name: angle}`` between each feedback matrix and what it replaces
            (``rule.feedback_pairs()``), in degrees; empty for rules without feedback matrices.
    """

    block_cosine: list[float]
    weight_angle_deg: dict[str, float] = field(default_factory=dict)


def hidden_blocks(model: nn.Module) -> list[nn.Module]:
    """Every child of the model but the last (the head)."""
    return list(model.children())[:-1]


def block_cosine(signal: Tensor | None, reference: Tensor | None) -> float:
    """Mean over samples of the cosine between ``signal[n]`` and ``reference[n]`` (both (N, ...)).

    NaN when either is missing or every sample has a zero vector; zero vectors are left out.
    """
    if signal is None or reference is None:
        return math.nan
    s = signal.detach().reshape(len(signal), -1).double()  # (N, n_i); float64: cos 1 means 1
    r = reference.detach().reshape(len(reference), -1).double()
    norms = s.norm(dim=1) * r.norm(dim=1)  # (N,)
    keep = norms > 0
    if not keep.any():
        return math.nan
    return ((s * r).sum(1)[keep] / norms[keep]).mean().item()


@torch.no_grad()
def weight_angles(rule: nn.Module) -> dict[str, float]:
    """Angle in degrees between each ``B`` and its reference in ``rule.feedback_pairs()``."""
    pairs = rule.feedback_pairs() if hasattr(rule, "feedback_pairs") else {}
    angles = {}
    for name, (B, ref) in pairs.items():
        b, w = B.detach().flatten().double(), ref.detach().flatten().double()
        if not (b.norm() > 0 and w.norm() > 0):
            angles[name] = math.nan
            continue
        b, w = b / b.norm(), w / w.norm()
        # 2 atan2(|b - w|, |b + w|) is arccos(b.w) without its loss of digits near 0 and 180 degrees.
        angles[name] = math.degrees(2 * math.atan2((b - w).norm().item(), (b + w).norm().item()))
    return angles


#: where the signal is read: the block's output h_i, or the input a_i of the activation producing it
PLACES = ("output", "pre-activation")
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _check_place(at: str) -> None:
    if at not in PLACES:
        raise ValueError(f"unknown alignment place {at!r}; allowed: {', '.join(PLACES)}")


class _Recorder:
    """Forward hooks that catch the gradient arriving at each block's output (``at="output"``) or at
    the input of the activation call whose result *is* the block's output (``at="pre-activation"``:
    the call, not the module, so a ReLU used twice in a residual block, or an identity shortcut
    registered after it, is never mistaken for it)."""

    def __init__(self, blocks: list[nn.Module], at: str = "output"):
        _check_place(at)
        self.grads: list[Tensor | None] = [None] * len(blocks)
        self.handles = []
        for i, block in enumerate(blocks):
            if at == "output":
                self.handles.append(block.register_forward_hook(self._on_output(i)))
                continue
            calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # this forward's activation calls
            self.handles.append(block.register_forward_pre_hook(lambda m, args, calls=calls: calls.clear()))
            for act in (m for m in block.modules() if isinstance(m, ACTIVATIONS)):
                self.handles.append(act.register_forward_hook(
                    lambda m, args, out, calls=calls: calls.append((m, args[0], out))))
            self.handles.append(block.register_forward_hook(self._on_pre_activation(i, calls)))

    def _on_output(self, i: int):
        def on_forward(module, inputs, output):
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda g: self._add(i, g))

        return on_forward

    def _on_pre_activation(self, i: int, calls):
        def on_forward(module, inputs, output):
            found = [(m, a) for m, a, out in calls if out is output]
            if not found:
                raise ValueError(f"pre-activation alignment reads the input of the activation that produces each "
                                 f"block's output; block {i}'s output comes from none of "
                                 f"{', '.join(a.__name__ for a in ACTIVATIONS)}: use at=output")
            act, a = found[-1]
            if a is output and not isinstance(act, nn.Identity):
                raise ValueError(f"block {i} ends in an in-place {type(act).__name__}: its input is overwritten by "
                                 "its output, so the pre-activation cannot be read; use inplace=False or at=output")
            if isinstance(a, Tensor) and a.requires_grad:
                a.register_hook(lambda g: self._add(i, g))

        return on_forward

    def _add(self, i: int, g: Tensor) -> None:
        # A block run twice with a graph each time gets the sum, as its parameters would.
        g = g.detach().clone()  # autograd may reuse the buffer it hands us
        self.grads[i] = g if self.grads[i] is None else self.grads[i] + g

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _rng_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextmanager
def _same_random_state(state: dict):
    """Run under the random state in ``state`` (captured by ``_random_state``); restore after."""
    with torch.random.fork_rng(devices=list(state["cuda"])):
        torch.set_rng_state(state["cpu"])
        for d, s in state["cuda"].items():
            torch.cuda.set_rng_state(s, d)
        yield


def _random_state(devices: list[int]) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": {d: torch.cuda.get_rng_state(d) for d in devices}}


class AlignmentProbe:
    """Record the signals of one real training step, then compare them with BP.

    Cheaper than :func:`measure` (no copy of the rule): the hooks sit on ``rule.model`` for the
    step inside the ``with`` block; a plain copy of the model is taken on entry, so the BP reference
    sees the weights, BatchNorm statistics and random state the step started from. The step's
    ``.grad`` are the rule's own and are left for the optimizer.

        with AlignmentProbe(rule) as probe:
            out = rule.step(x, y)
        result = probe.alignment(x, y)  # before opt.step(): weight angles read the current B, W
        opt.step()

    Args:
        rule: any rule (``Rule`` subclass): ``rule.model`` is a Sequential of blocks + head.
        at: ``"output"`` (the signal at each block's output) or ``"pre-activation"`` (at the
            input of each block's final activation: ``delta_i``).
    """

    def __init__(self, rule: nn.Module, at: str = "output"):
        _check_place(at)
        self.rule, self.at = rule, at
        self._recorder: _Recorder | None = None
        self._reference: nn.Module | None = None
        self._random: dict | None = None

    def __enter__(self) -> AlignmentProbe:
        # The copy first: it must not carry the hooks registered next.
        self._reference = plain_copy(self.rule.model).requires_grad_(True)  # Shallow's frozen blocks too
        self._random = _random_state(_rng_devices(self.rule.model))
        self._recorder = _Recorder(hidden_blocks(self.rule.model), self.at)
        return self

    def __exit__(self, *exc) -> None:
        if self._recorder is not None:
            self._recorder.remove()

    @property
    def signals(self) -> list[Tensor | None]:
        """What each hidden block's output received in the step (None: nothing)."""
        if self._recorder is None:
            raise RuntimeError("AlignmentProbe: run rule.step inside `with probe:` first")
        return self._recorder.grads

    def alignment(self, x: Tensor, y: Tensor) -> Alignment:
        """Compare the recorded signals with BP's gradients for the same batch ``x, y``."""
        signals = self.signals
        reference = self._reference
        if reference is None:
            raise RuntimeError("AlignmentProbe.alignment was already called; use one probe per step")
        recorder = _Recorder(hidden_blocks(reference), self.at)
        try:
            with _same_random_state(self._random), torch.enable_grad():
                loss = self.rule.loss.value(reference(x), y)
                loss.backward()
        finally:
            recorder.remove()
        self._reference = None  # free the copy: one probe, one step
        return Alignment([block_cosine(s, r) for s, r in zip(signals, recorder.grads, strict=True)],
                         weight_angles(self.rule))


def measure(rule: nn.Module, x: Tensor, y: Tensor, at: str = "output") -> Alignment:
    """Alignment of ``rule``'s signals with BP's gradients on the batch ``x, y``, without side effects.

    The step runs on a deep copy of the rule, in the rule's train/eval mode: the rule's ``.grad``,
    BatchNorm statistics, feedback state and the global random state are untouched, so it can be
    called anywhere in a training loop (e.g. every 50 steps on the current batch).

    Args:
        rule: any rule; ``rule.model`` is a Sequential of blocks + head.
        x: a batch of inputs, on the rule's device; y: its (N,) class labels.
        at: where each block's signal is read: ``"output"`` or ``"pre-activation"``.

    Returns:
        :class:`Alignment`: per hidden block mean per-sample cosine with BP, and weight angles.

    References: Yang, Lee & Park 2024, Fig. 4.
    """
    params = list(rule.parameters())  # frozen ones too
    grads = [p.grad for p in params]
    for p in params:  # set aside for the copy: the twin needs no copy of the accumulated .grad
        p.grad = None
    try:
        twin = copy.deepcopy(rule)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
    with torch.random.fork_rng(devices=_rng_devices(rule)):  # the twin's step must not move the RNG
        with AlignmentProbe(twin, at) as probe:
            twin.step(x, y)
        return probe.alignment(x, y)
