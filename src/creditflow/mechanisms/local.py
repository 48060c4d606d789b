"""Local modules: small trained networks on a block's detached output.

A local module reads ``h_i`` (cut from the graph, so its loss never reaches the block) and is
trained on a local objective. LAS/LTAS then use the module's *backward* as the block's feedback:
the block receives the vector-Jacobian product of the module at ``h_i`` applied to the output
error ``e``. Both modules here are linear in ``h``, so that product does not depend on ``h`` and
has a closed form (no autograd call in the hot path):

- ``LinearLocal`` (fully connected blocks, LAS eq. 19): ``y = B^T h``, feedback ``B e``.
- ``ConvLocal`` (conv blocks, LAS Sec. III.C): one k x k convolution to C planes, then global
  average pooling; feedback is the transposed ("flipped-kernel") convolution of ``e`` spread
  evenly over the block's H x W positions.

References: Yang, Lee & Park 2024, Sec. III (LAS/LTAS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class LinearLocal(nn.Module):
    """``y_i = B^T h_i`` with ``weight`` = B^T stored as (C, n_i), no bias (as the paper).

    With ``pool = k > 1`` (a (d, H, W) block output) the module first averages k x k patches
    (stride k), ``y_i = B^T avgpool_k(h_i)``: the ASAP thesis's local classifier (Sec. 5.2.4);
    ``weight`` is then (C, d * (H//k) * (W//k)).
    """

    def __init__(self, shape: Sequence[int], num_classes: int, pool: int = 1):
        super().__init__()
        self.shape = torch.Size(shape)
        if pool < 1 or (pool > 1 and len(self.shape) != 3):
            raise ValueError(f"pool must be 1, or > 1 for a (d, H, W) block output; got pool={pool}, "
                             f"shape={tuple(self.shape)}")
        self.pool = pool
        pooled = self.shape if pool == 1 else (self.shape[0], self.shape[1] // pool, self.shape[2] // pool)
        n = math.prod(pooled)
        self.weight = nn.Parameter(torch.empty(num_classes, n).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n)))

    def forward(self, h: Tensor) -> Tensor:
        if self.pool > 1:
            h = F.avg_pool2d(h, self.pool)
        return h.flatten(1) @ self.weight.T  # (N, C)

    def feedback(self, e: Tensor, h: Tensor | None = None) -> Tensor:
        """VJP at any h: ``e @ weight``, shaped like the block output (through the pool's adjoint)."""
        if self.pool == 1:
            return (e @ self.weight).view(e.shape[0], *self.shape)
        d, H, W = self.shape
        k = self.pool
        g = (e @ self.weight).view(e.shape[0], d, H // k, W // k)
        # avg_pool2d's adjoint: each pooled gradient spread evenly over its k x k patch; the rows and
        # columns the pool drops (H, W not multiples of k) get zero.
        ones = g.new_full((d, 1, k, k), 1 / (k * k))
        return F.conv_transpose2d(g, ones, stride=k, groups=d, output_padding=(H % k, W % k))


POOLS = ("avg", "max")


class ConvLocal(nn.Module):
    """A k x k convolution from the block's d planes to C planes, then global average (or max) pooling."""

    def __init__(self, shape: Sequence[int], num_classes: int, kernel_size: int = 3, pool: str = "avg"):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"local conv kernel_size must be odd (same padding), got {kernel_size}")
        if pool not in POOLS:
            raise ValueError(f"unknown local pool {pool!r}; available: {', '.join(POOLS)}")
        self.pool = pool
        self.shape = torch.Size(shape)  # (d, H, W)
        self.padding = kernel_size // 2
        d = self.shape[0]
        bound = 1 / math.sqrt(d * kernel_size * kernel_size)  # PyTorch's Conv2d default range
        self.weight = nn.Parameter(torch.empty(num_classes, d, kernel_size, kernel_size).uniform_(-bound, bound))

    def forward(self, h: Tensor) -> Tensor:
        z = F.conv2d(h, self.weight, padding=self.padding)  # (N, C, H, W)
        return z.mean((2, 3)) if self.pool == "avg" else z.amax((2, 3))  # (N, C)

    def feedback(self, e: Tensor, h: Tensor | None = None) -> Tensor:
        """VJP at ``h``: the pooling's adjoint (average: ``e`` spread over H x W, at any ``h``; max: ``e``
        at each plane's argmax, which needs ``h``), then the conv's adjoint, a transposed convolution."""
        _, H, W = self.shape
        if self.pool == "avg":
            spread = (e / (H * W))[:, :, None, None].expand(-1, -1, H, W)
        else:
            if h is None:
                raise ValueError("a max-pooled local module's feedback depends on the block output: pass h")
            z = F.conv2d(h, self.weight, padding=self.padding).flatten(2)  # (N, C, H*W)
            spread = torch.zeros_like(z).scatter_(2, z.argmax(2, keepdim=True), e[:, :, None]).view(-1, e.shape[1], H, W)
        return F.conv_transpose2d(spread, self.weight, padding=self.padding)  # (N, d, H, W)


def local_module(shape: Sequence[int], num_classes: int, kernel_size: int = 3, pool: str = "avg") -> nn.Module:
    """The paper's module for a block output of ``shape``: conv + global pool for (d, H, W), linear otherwise."""
    return ConvLocal(shape, num_classes, kernel_size, pool) if len(shape) == 3 else LinearLocal(shape, num_classes)


def freeze(module: nn.Module) -> nn.Module:
    """Turn ``module.weight`` into a buffer of the same name and value: a fixed random module.

    It then leaves every optimizer (``rule.parameters()``) yet stays in ``state_dict`` and moves
    with ``.to()``. Mostafa et al. 2018's local classifiers are fixed this way.
    """
    weight = module.weight.detach()
    del module.weight
    module.register_buffer("weight", weight)
    return module
