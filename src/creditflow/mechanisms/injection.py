"""Block-output injection: cut the graph at block inputs, then one backward with signals.

A direct rule runs the blocks with every block input detached, computes the output error
``e = dL/d(logits)`` once, turns it into one signal per block (``s_i = B_i e`` for DFA), and
calls a single ``torch.autograd.backward([logits, h_1, ..., h_k], [e, s_1, ..., s_k])``.
No ``retain_graph``, no per-block backward loop, no host sync: the skipped input-gradient
products are why DFA-style rules run faster than BP.

References: Nøkland 2016 (DFA); Launay et al. 2020 (block-wise DFA, TinyDFA).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .modes import eval_mode, probe_batch


def run_cut(blocks: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    """Run ``blocks`` in order with each block's input detached; return every block output."""
    outputs = []
    h = x
    for block in blocks:
        h = block(h.detach())
        outputs.append(h)
    return outputs


class BoundaryCut:
    """The cut of :func:`run_cut` on a model's own forward: at the outputs of named submodules.

    For models that are not a Sequential of blocks (a timm ResNet or ViT), the model runs its own
    ``forward`` unchanged; while the cut is active, a forward hook on each boundary module records
    its output ``h_i`` (with its graph) and hands the rest of the model ``h_i.detach()`` instead, so
    the next block starts a graph of its own: exactly ``block(h.detach())`` of :func:`run_cut`.
    The hooks live only inside ``__call__`` (inference and copies of the model see no hooks), and a
    boundary is looked up by name at every call, so a layer swapped in later is still found.

    Limits: a boundary must output one tensor (any shape: (N, C, H, W), ViT tokens (N, T, D), ...),
    run once per forward, and be a point every path passes through: a skip connection around it
    would carry gradient across the cut (:meth:`probe` finds that and says so).

    Args:
        model: any module whose forward returns the logits (N, C).
        names: dotted module names (``model.get_submodule``) whose outputs end blocks, in forward order.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model, self.names = model, list(names)
        for name in self.names:
            self.module(name)  # an unknown name fails here, not at the first step

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in self.model.named_children())
            raise ValueError(f"no module named {name!r} in {type(self.model).__name__} for a block boundary; "
                             f"top-level children: {children}") from None

    @contextmanager
    def _hooks(self, outputs: list, order: list | None = None) -> Iterator[None]:
        def cut(i: int, name: str):
            def hook(module, args, h):
                if not isinstance(h, Tensor):
                    raise ValueError(f"block boundary {name!r} returns {type(h).__name__}; a boundary must "
                                     "output one tensor: choose a module inside it whose output is a tensor")
                if outputs[i] is not None:
                    raise ValueError(f"block boundary {name!r} ran twice in one forward pass; a boundary "
                                     "must run once (a module used twice cannot end one block)")
                outputs[i] = h  # h_i: the block's output, with its graph
                if order is not None:
                    order.append(i)
                return h.detach()  # the next block starts here: no gradient crosses the cut
            return hook

        handles = [self.module(n).register_forward_hook(cut(i, n)) for i, n in enumerate(self.names)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(logits, [h_1 .. h_k])`` from one forward of the model, every boundary cut."""
        outputs: list[Tensor | None] = [None] * len(self.names)
        with self._hooks(outputs):
            logits = self.model(x)
        if any(h is None for h in outputs):
            missing = [n for n, h in zip(self.names, outputs) if h is None]
            raise ValueError(f"block boundaries {missing} did not run in the forward pass")
        return logits, outputs

    def probe(self, input_shape: Sequence[int]) -> CutProbe:
        """Check the cut on a 2-sample forward (eval mode) and find each block's output shape and parameters.

        Errors (one line each) for a boundary that does not run, runs out of the given order or twice,
        returns no tensor, for model outputs that are not (N, C) tensors, and for a parameter
        reached from two blocks (a path around a boundary, or a weight shared across blocks).
        """
        outputs: list[Tensor | None] = [None] * len(self.names)
        order: list[int] = []
        # eval: BatchNorm must not learn from the probe
        with eval_mode(self.model), torch.enable_grad(), self._hooks(outputs, order):
            logits = self.model(probe_batch(self.model, input_shape))
        if any(h is None for h in outputs):
            missing = [n for n, h in zip(self.names, outputs) if h is None]
            raise ValueError(f"block boundaries {missing} did not run in the forward pass")
        if order != sorted(order):
            raise ValueError(f"block boundaries must be listed in forward order: {[self.names[i] for i in order]}")
        if not isinstance(logits, Tensor) or logits.ndim < 2:
            raise ValueError(f"the model must return an output (N, ..., C) for a direct rule, got "
                             f"{type(logits).__name__}{tuple(logits.shape) if isinstance(logits, Tensor) else ''}")
        if logits.grad_fn is None and self.names:
            raise ValueError(f"nothing trainable follows the last block boundary {self.names[-1]!r}: the head "
                             "(everything after it) must have parameters; drop the last name")
        reached = [_leaves(t) for t in [*outputs, logits]]
        where = [*(repr(n) for n in self.names), "the head"]
        for name, p in self.model.named_parameters():  # in definition order: the same error every run
            blocks = [where[i] for i, ids in enumerate(reached) if id(p) in ids]
            if len(blocks) > 1:
                raise ValueError(
                    f"parameter {name!r} gets gradient from two blocks (ending at {blocks[0]} and {blocks[1]}): "
                    "a path goes around a boundary (a skip connection) or a weight is shared; choose "
                    "boundaries every path passes through")
        return CutProbe([h.shape[1:] for h in outputs],
                        [[p for p in self.model.parameters() if id(p) in ids] for ids in reached], logits.shape[1:])


@dataclass
class CutProbe:
    shapes: list[torch.Size]  # per-sample output shape of each block ending at a boundary
    parameters: list[list[nn.Parameter]]  # per block (the head last): the model parameters it trains
    output_shape: torch.Size  # per-sample shape of the model's output: (..., C)


def _leaves(t: Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) the graph of ``t`` reaches: what ``t.backward`` would fill."""
    seen, found = set(), set()
    stack = [t.grad_fn] if t.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf itself
        if variable is not None:
            found.add(id(variable))
        stack.extend(f for f, _ in fn.next_functions)
    return found


class Segment:
    """The part of a model between two boundaries of a :class:`BoundaryCut`, known by its parameters.

    What rules ask of a block besides running it: ``parameters()`` (Shallow freezes them with
    ``requires_grad_``) and ``modules()`` (those holding its parameters; LAS reads the last conv's kernel).
    """

    def __init__(self, name: str, model: nn.Module, params: Sequence[nn.Parameter]):
        self.name, self._params = name, list(params)
        ids = {id(p) for p in self._params}
        self._modules = [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return iter(self._params)

    def modules(self) -> Iterator[nn.Module]:
        return iter(self._modules)

    def requires_grad_(self, requires_grad: bool = True) -> Segment:
        for p in self._params:
            p.requires_grad_(requires_grad)
        return self

    def __repr__(self) -> str:
        return f"Segment(up to {self.name!r}, {len(self._params)} parameters)"


def inject(outputs: Sequence[Tensor], signals: Sequence[Tensor | None]) -> None:
    """One backward pass: each output receives its signal as its gradient.

    Outputs with a ``None`` signal or no graph (frozen blocks) are skipped.
    """
    pairs = [(h, s if s.dtype == h.dtype else s.to(h.dtype))
             for h, s in zip(outputs, signals, strict=True) if s is not None and h.requires_grad]
    if pairs:
        torch.autograd.backward([h for h, _ in pairs], [s for _, s in pairs])


class DirectFeedback(nn.Module):
    """Fixed matrices ``B_i`` that map an error vector of C to each block's output shape.

    All ``B_i`` live side by side in one (C, n_1 + ... + n_k) buffer ``weight``, so every block's
    signal comes from a single matmul ``v @ weight``; block i's part is a view of the product
    reshaped to (N, *shape_i). ``matrices`` gives the per-block (C, n_i) views. An error with
    position axes, (N, T, C) of a language model, is projected at every position alike: ``shape_i``
    is then the block's per-position shape (D,), as TinyDFA projects a Transformer's error.
    Default init: uniform in ``±scale/sqrt(n_i)``, the distribution of a transposed PyTorch
    Linear head at init, so the last hidden block's signal starts at BP's scale.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], num_classes: int, scale: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"feedback_scale must be > 0, got {scale}")
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.register_buffer("weight", torch.empty(num_classes, sum(self.sizes)))
        for B, n in zip(self.matrices, self.sizes):
            B.uniform_(-scale / math.sqrt(n), scale / math.sqrt(n), generator=generator)

    @torch.no_grad()
    def set_matrices(self, matrices: Sequence[Tensor]) -> None:
        """Overwrite every ``B_i`` (e.g. with the downstream products, ``feedback_init="product"``)."""
        for B, M in zip(self.matrices, matrices, strict=True):
            B.copy_(M.reshape(B.shape))

    @property
    def matrices(self) -> list[Tensor]:
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        # narrow, not split: a multi-output view could not be written in place (B.copy_(...)).
        return [self.weight.narrow(1, a, n) for a, n in zip(starts, self.sizes)]

    def forward(self, v: Tensor, blocks: range | None = None) -> list[Tensor]:
        """``v``: (N, ..., C) -> one signal per block of ``blocks`` (default: all), each (N, ..., *shape_i)."""
        blocks = range(len(self.sizes)) if blocks is None else blocks
        start = sum(self.sizes[:blocks.start])
        sizes, shapes = self.sizes[blocks.start:blocks.stop], self.shapes[blocks.start:blocks.stop]
        lead = v.shape[:-1]  # (N,), or (N, T) with position axes
        s = v.reshape(-1, v.shape[-1]) @ self.weight.narrow(1, start, sum(sizes))  # (M, n_a + ... + n_b): one matmul
        # Each part is a strided view; splitting its contiguous last dim needs no copy.
        return [part.view(*lead, *shape) for part, shape in zip(s.split(sizes, dim=1), shapes)]


FEEDBACK_INITS = ("random", "product")


def check_feedback_init(name: str) -> str:
    if name not in FEEDBACK_INITS:
        raise ValueError(f"unknown feedback_init {name!r}; available: {', '.join(FEEDBACK_INITS)}")
    return name


@torch.no_grad()
def downstream_product(blocks: Sequence[nn.Module]) -> Tensor:
    """The product ``W_L ... W_{i+1}`` of the Linear weights in ``blocks``, shape (C, n_i).

    It is the network's map from a block's output to the logits with every activation
    replaced by the identity: exactly BP's feedback in a linear network (LAS paper eq. 29), and
    the paper's initial feedback for its alignment experiment. Defined for fully connected
    blocks only: a Conv2d (or any other layer with parameters but Linear) has no such matrix.
    """
    product = None
    for block in blocks:
        for m in block.modules():
            if isinstance(m, nn.Linear):
                W = m.weight.detach()
                product = W if product is None else W @ product
            elif next(m.parameters(recurse=False), None) is not None:
                raise ValueError(
                    f"feedback_init='product' needs fully connected blocks downstream, found "
                    f"{type(m).__name__}; use feedback_init='random' for conv/normalised models")
    if product is None:
        raise ValueError("no Linear layer downstream to take a product of")
    return product.clone()  # a copy, never a view of W
