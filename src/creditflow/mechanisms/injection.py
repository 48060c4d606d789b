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
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def output_error(logits: Tensor, target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Loss and ``e = dL/d(logits)`` for any differentiable loss, without touching the model graph."""
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        loss = loss_fn(z, target)
        (e,) = torch.autograd.grad(loss, z)
    return loss.detach(), e


def run_cut(blocks: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    """Run ``blocks`` in order with each block's input detached; return every block output."""
    outputs = []
    h = x
    for block in blocks:
        h = block(h.detach())
        outputs.append(h)
    return outputs


def inject(outputs: Sequence[Tensor], signals: Sequence[Tensor | None]) -> None:
    """One backward pass: each output receives its signal as its gradient.

    Outputs with a ``None`` signal or no graph (frozen blocks) are skipped.
    """
    pairs = [(h, s) for h, s in zip(outputs, signals, strict=True) if s is not None and h.requires_grad]
    if pairs:
        torch.autograd.backward([h for h, _ in pairs], [s for _, s in pairs])


@torch.no_grad()
def block_output_shapes(blocks: Sequence[nn.Module], input_shape: Sequence[int]) -> list[torch.Size]:
    """Per-sample output shape of each block, from a 2-sample probe run in eval mode."""
    first = next((p for b in blocks for p in b.parameters()), None)
    device = first.device if first is not None else None
    dtype = first.dtype if first is not None else None
    h = torch.zeros(2, *input_shape, device=device, dtype=dtype)
    shapes = []
    for block in blocks:
        was_training = block.training
        block.eval()  # BatchNorm must not learn from the probe
        try:
            h = block(h)
        finally:
            block.train(was_training)
        shapes.append(h.shape[1:])
    return shapes


class DirectFeedback(nn.Module):
    """Fixed matrices ``B_i`` that map a (N, C) vector to each block's output shape.

    All ``B_i`` live side by side in one (C, n_1 + ... + n_k) buffer ``weight``, so every block's
    signal comes from a single matmul ``v @ weight``; block i's part is a view of the product
    reshaped to (N, *shape_i). ``matrices`` gives the per-block (C, n_i) views.
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

    def forward(self, v: Tensor) -> list[Tensor]:
        """``v``: (N, C) -> one signal per block, each (N, *shape_i)."""
        s = v @ self.weight  # (N, n_1 + ... + n_k)
        # Each part is a strided view; splitting its contiguous last dim needs no copy.
        return [part.view(v.shape[0], *shape) for part, shape in zip(s.split(self.sizes, dim=1), self.shapes)]


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
