"""Fully connected networks: ``mlp:784-1024-1024-10``."""

from __future__ import annotations

import math

from torch import nn

from ..registry import register_model
from .blocks import BlockNet, apply_init, parse_dims
from .blocks import activation as make_activation


@register_model("mlp", summary="fully connected net, e.g. mlp:784-1024-1024-10 (activation=relu|tanh|identity|..., "
                "batch_norm, bias)", paper="LAS paper Sec. IV.A")
def mlp(spec: str = "784-1024-1024-10", *, activation: str = "relu", batch_norm: bool = False, bias: bool = True,
        init: str = "torch", input_shape=None, num_classes: int | None = None) -> BlockNet:
    """One block per hidden layer (Linear [+ BatchNorm1d] + activation), then a Linear head.

    The first block flattens its input, so image tensors (N, C, H, W) go in unchanged.
    ``input_shape`` defaults to ``(D0,)``; pass the image shape to document it. ``batch_norm``
    normalises each hidden layer's pre-activation (Linear, BN, activation: the order of the ASAP
    authors' code, code/convnet.py); the head stays a plain Linear. ``activation=identity``
    makes a linear network; ``bias=False`` drops every Linear's bias. ``init``: ``torch`` (PyTorch's
    default: uniform in ``±1/sqrt(fan_in)``) or ``he-normal`` (``std = sqrt(2/fan_in)``, zero biases).
    """
    dims = parse_dims(spec, "mlp sizes")
    if len(dims) < 3:
        raise ValueError(f"mlp needs an input, at least one hidden and an output size, got {spec!r}")
    if num_classes is not None and num_classes != dims[-1]:
        raise ValueError(f"mlp output size {dims[-1]} does not match the dataset's {num_classes} classes")
    if input_shape is not None and math.prod(input_shape) != dims[0]:
        raise ValueError(f"mlp input size {dims[0]} does not match input shape {tuple(input_shape)}: the data has "
                         f"{math.prod(input_shape)} values a sample (e.g. mlp:{math.prod(input_shape)}-"
                         f"{'-'.join(map(str, dims[1:]))})")
    blocks: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-2], dims[1:-1])):
        layers = [nn.Flatten()] if i == 0 else []
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(d_out))
        blocks.append(nn.Sequential(*layers, make_activation(activation)))
    blocks.append(nn.Linear(dims[-2], dims[-1], bias=bias))
    return apply_init(BlockNet(blocks, input_shape or (dims[0],)), init)
