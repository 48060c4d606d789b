"""The paper's VGG, folded for Associated Learning and unfolded for BP (Kao & Chen 2021, Sec. 5.2).

The paper cites Simonyan & Zisserman but gives no layers; this is the network of the authors'
code (CIFAR10/models.py, ``VGG_AL``). Every conv is 3x3 "same" + BatchNorm + activation:

    f_1: conv 128, conv 256, max-pool 2        (32 -> 16)
    f_2: conv 256, conv 512, max-pool 2        (16 -> 8)
    f_3: conv 512, max-pool 2, conv 512, max-pool 2   (8 -> 2)
    f_4: flatten, FC 1024, FC 1024
    t_i: 300 units; bridges: flatten, FC 1500, FC 300 (sigmoid); h_4..h_2: FC 300, h_1: FC C

``vgg`` (BP) is that inference path with ReLU and a linear head. The authors' BP ``VGG`` differs
in two ways we do not copy: it lacks f_4's two FC 1024 layers (so its parameters do not match
AL's, against Sec. 5.1) and puts BatchNorm after its FC layers. ``components`` regroups the 8
units (6 conv units, 2 FC) evenly.
"""

from __future__ import annotations

import math

from torch import nn

from ..mechanisms.modes import block_output_shapes
from ..registry import register_model
from .associated import AssociatedNet, fold, unfold
from .blocks import BlockNet
from .blocks import activation as make_activation

#: (out channels, max-pool after) per conv unit, then the FC widths of f_4
CONVS = ((128, False), (256, True), (256, False), (512, True), (512, True), (512, True))
FC = (1024, 1024)


def vgg_units(input_shape, activation: str) -> list[nn.Module]:
    if input_shape is None or len(input_shape) != 3:
        raise ValueError(f"vgg needs input_shape (C, H, W), got {input_shape!r}")
    if min(input_shape[1:]) < 16:
        raise ValueError(f"vgg halves the map 4 times; input_shape {tuple(input_shape)} is under 16x16")
    make_activation(activation)
    units, c = [], input_shape[0]
    for width, pool in CONVS:
        layers = [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                  make_activation(activation)]
        units.append(nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else [])))
        c = width
    d = math.prod(block_output_shapes(units, input_shape)[-1])  # 512 x 2 x 2 for 32x32 inputs
    for i, width in enumerate(FC):
        units.append(nn.Sequential(*([nn.Flatten()] if i == 0 else []), nn.Linear(d, width),
                                   make_activation(activation)))
        d = width
    return units


@register_model("al-vgg", paper="Kao & Chen 2021, Sec. 5.2; authors' code",
                summary="associated-learning VGG: 6 conv-BN (128-512) + 2 FC 1024 in 4 components, t-side 300")
def al_vgg(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, activation: str = "elu",
           width: int = 300, **options) -> AssociatedNet:
    if spec:
        raise ValueError(f"al-vgg takes no ':' details, got {spec!r}; use options, e.g. width=300")
    return fold(vgg_units(input_shape, activation), input_shape=input_shape, num_classes=num_classes, width=width,
                default_sizes=[2, 2, 2, 2], **options)


@register_model("vgg", summary="BP twin of al-vgg: its inference path (bridge FC 1500-300, 3 FC 300) with ReLU",
                paper="Kao & Chen 2021, Sec. 5.2; authors' code")
def vgg(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, activation: str = "relu",
        width: int = 300, **options) -> BlockNet:
    if spec:
        raise ValueError(f"vgg takes no ':' details, got {spec!r}; use options, e.g. width=300")
    return unfold(vgg_units(input_shape, activation), input_shape=input_shape, num_classes=num_classes, width=width,
                  default_sizes=[2, 2, 2, 2], activation=activation, **options)
