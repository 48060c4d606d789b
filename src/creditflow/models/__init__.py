"""Models: a sequence of blocks plus a head, built by name.

>>> model = build("mlp:784-1024-1024-10")
>>> model = build("conv3", input_shape=(3, 32, 32), num_classes=100)
"""

from __future__ import annotations

from torch import nn

from ..registry import MODELS, check_options
from . import alexnet, associated, cifar_resnet, conv, mlp, resnet, vanilla_cnn, vgg  # noqa: F401  (import is registration)
from .blocks import BlockNet


def build(spec: str, **options) -> nn.Module:
    """Build a model from ``"name"`` or ``"name:details"``; options go to the builder."""
    name, _, details = spec.partition(":")
    entry = MODELS.get(name)
    check_options("model", name, entry.builder, options)
    try:
        return entry.builder(details, **options) if details else entry.builder(**options)
    except TypeError as err:
        raise ValueError(f"bad options for model {name!r}: {err}") from None


def available() -> list[str]:
    return MODELS.available()


__all__ = ["BlockNet", "build", "available"]
