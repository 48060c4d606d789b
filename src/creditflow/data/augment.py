"""Batch augmentation as tensor ops on the batch's device.

Every op takes a whole batch (N, C, H, W), uint8 or float, and returns the same shape and
dtype; per-sample randomness is drawn at once (no Python loop over samples), so augmenting a
GPU batch costs a few kernels. Random numbers come from ``generator`` (on its device, CPU by
default) and are then moved to the batch's device, so a seeded CPU generator gives the same
augmentation on any device.

Ops (``build("flip,crop,cutout")``):

- ``flip``: horizontal flip of each sample with probability 0.5.
- ``crop``: pad 4 pixels of zeros on every side, then crop back to H x W at a random offset
  per sample (0..8 in each direction).
- ``cutout`` / ``cutout<S>``: zero one S x S square (default S = H // 2, i.e. 16 for 32-pixel
  images) centred at a uniformly random pixel; the square is clipped at the borders, as in
  DeVries and Taylor 2017.
- ``randaugment``: a light RandAugment. Two layers; in each, every sample independently takes
  one of identity, brightness, contrast, translate-x, translate-y, shear-x, shear-y at the
  paper's common magnitude M = 9 (of 30) with a random sign: brightness and contrast factors
  1 +- 0.27, shear +-0.09, translation +-round(0.136 W) whole pixels (nearest-neighbour
  resampling, zero fill). Differences from the paper: fewer ops (no rotate, posterize,
  solarize, equalize, auto-contrast, colour, sharpness); contrast uses each sample's mean over
  all channels. uint8 results are rounded and clamped to 0..255; float results are not clamped.

References:
    DeVries and Taylor 2017, "Improved regularization of convolutional neural networks with
    cutout". Cubuk, Zoph, Shlens and Le 2020, "RandAugment: practical automated data
    augmentation with a reduced search space", section 3.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

AVAILABLE = ("crop", "cutout", "flip", "randaugment")


def _rand(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(n,) uniform [0, 1) drawn on the generator's device, returned on ``device``."""
    source = generator.device if generator is not None else torch.device("cpu")
    return _move(torch.rand(n, generator=generator, device=source), device)


def _randint(high: int, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(n,) integers in [0, high) drawn on the generator's device, returned on ``device``."""
    source = generator.device if generator is not None else torch.device("cpu")
    return _move(torch.randint(high, (n,), generator=generator, device=source), device)


def _move(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; a CPU draw bound for CUDA goes through pinned memory, so the copy does
    not block the host (a pageable copy would, once per augmentation op per batch)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each sample left-right with probability ``p``."""
    chosen = _rand(len(x), generator, x.device) < p  # (N,)
    return torch.where(chosen[:, None, None, None], x.flip(-1), x)


def crop(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut an H x W window at a random offset per sample."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (N, C, H+2p, W+2p), zeros
    dy = _randint(2 * padding + 1, n, generator, x.device)
    dx = _randint(2 * padding + 1, n, generator, x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]


def cutout(x: torch.Tensor, generator: torch.Generator | None = None, size: int | None = None) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square (default H // 2) at a random centre per sample."""
    n, _, h, w = x.shape
    size = h // 2 if size is None else size
    top = _randint(h, n, generator, x.device) - size // 2  # (N,) centre minus half the side
    left = _randint(w, n, generator, x.device) - size // 2
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    in_rows = (ys >= top[:, None]) & (ys < top[:, None] + size)  # (N, H)
    in_cols = (xs >= left[:, None]) & (xs < left[:, None] + size)  # (N, W)
    square = in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    return x.masked_fill(square[:, None], 0)


# RandAugment ops by index; magnitude M = 9 on the paper's 0..30 scale.
_OPS = ("identity", "brightness", "contrast", "translate-x", "translate-y", "shear-x", "shear-y")
_FACTOR = 0.9 * 9 / 30  # brightness/contrast: 1 +- 0.27
_SHEAR = 0.3 * 9 / 30  # 0.09
_TRANSLATE = 150 / 331 * 9 / 30  # fraction of the width: 0.136


def randaugment(x: torch.Tensor, generator: torch.Generator | None = None, layers: int = 2) -> torch.Tensor:
    """Apply ``layers`` randomly chosen ops per sample (see the module docstring)."""
    n, _, h, w = x.shape
    out = x.to(torch.float32)
    shift = round(_TRANSLATE * w) * 2 / w  # whole pixels, in grid_sample's [-1, 1] units
    for _ in range(layers):
        op = _randint(len(_OPS), n, generator, x.device)  # (N,)
        sign = torch.where(_rand(n, generator, x.device) < 0.5, -1.0, 1.0)  # (N,)
        # Geometry: one affine map per sample; identity rows for the intensity ops.
        theta = torch.zeros(n, 2, 3, device=x.device)  # (N, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = torch.where(op == 3, sign * shift, 0.0)
        theta[:, 1, 2] = torch.where(op == 4, sign * shift, 0.0)
        theta[:, 0, 1] = torch.where(op == 5, sign * _SHEAR, 0.0)
        theta[:, 1, 0] = torch.where(op == 6, sign * _SHEAR, 0.0)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        # Intensity: x -> a x + b per sample; brightness (a, 0), contrast (a, (1 - a) mean).
        a = torch.where((op == 1) | (op == 2), 1.0 + sign * _FACTOR, 1.0)  # (N,)
        mean = out.mean(dim=(1, 2, 3))
        b = torch.where(op == 2, (1.0 - a) * mean, 0.0)
        out = out * a[:, None, None, None] + b[:, None, None, None]
    if x.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(x.dtype)


def parse(spec: str | list[str] | tuple[str, ...] | None) -> list[tuple[str, Callable]]:
    """Turn 'flip,crop,cutout8' (or a list of names) into (name, op) pairs.

    Raises:
        ValueError: an unknown name, with the available ones.
    """
    if spec is None:
        return []
    tokens = spec.split(",") if isinstance(spec, str) else list(spec)
    ops = []
    for token in (t.strip().lower() for t in tokens):
        if token in ("", "none"):
            continue
        sized = re.fullmatch(r"cutout(\d+)", token)
        if token in ("flip", "crop", "cutout", "randaugment"):
            ops.append((token, globals()[token]))
        elif sized and int(sized.group(1)) > 0:
            ops.append((token, functools.partial(cutout, size=int(sized.group(1)))))
        else:
            raise ValueError(f"unknown augmentation {token!r}; available: {', '.join(AVAILABLE)}")
    return ops


class Augment(nn.Module):
    """A sequence of batch augmentations; ``Augment(x, generator=None)`` applies them in order.

    Has no parameters or buffers; it is a module so models and trainers can hold it, and
    ``train()``/``eval()`` do not change it (the caller decides when to augment).
    """

    def __init__(self, spec: str | list[str] | None = None):
        super().__init__()
        self.ops = parse(spec)
        self.spec = ",".join(name for name, _ in self.ops) or "none"

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"augmentations take a batch (N, C, H, W), got shape {tuple(x.shape)}")
        for _, op in self.ops:
            x = op(x, generator)
        return x

    def extra_repr(self) -> str:
        return self.spec


def build(spec: str | list[str] | None) -> Augment:
    """Build an ``Augment`` from a spec such as ``"flip,crop,cutout"``; "none" or "" is identity."""
    return Augment(spec)
