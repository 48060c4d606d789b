"""The paper's vanilla CNN, folded for Associated Learning and unfolded for BP (Kao & Chen 2021, Sec. 5.2).

Encoder: four 3x3 convolutions of 32 channels, then four of 64; the fourth of each group has
stride 2 (32x32 -> 16x16 -> 8x8), every one "same" padding, no normalisation. AL folds them two
per component (4 components, as the authors' code): f_1 = conv1-2, f_2 = conv3-4, f_3 = conv5-6,
f_4 = conv7-8; t_i has 256 units and each bridge one hidden layer of 1280 (5 x 256). The BP
network of the paper's text is then exactly the AL inference path: 8 convs, FC 1280 and FC 256
(the last bridge), three FC 256 (h_4..h_2) and FC 10 (h_1): "13 hidden layers and 1 output".

The text's own folding ("five components, layer i and layer 14 - i in component i; layers 6-8
form component 6") places 13 of the 14 layers (the output layer in none) and differs from the
code; we follow the code. ``components`` regroups the 8 convolutions evenly (e.g. 8: one per component).
"""

from __future__ import annotations

from torch import nn

from ..registry import register_model
from .associated import AssociatedNet, fold, unfold
from .blocks import BlockNet, parse_dims
from .blocks import activation as make_activation


def vanilla_units(input_shape, channels: str, activation: str) -> list[nn.Module]:
    """Eight conv + activation units: per entry of ``channels``, three stride-1 convs then one stride-2."""
    widths = parse_dims(channels, "vanilla-cnn channels")
    make_activation(activation)
    units, c = [], input_shape[0]
    for width in widths:
        for k in range(4):
            units.append(nn.Sequential(nn.Conv2d(c, width, 3, stride=2 if k == 3 else 1, padding=1),
                                       make_activation(activation)))
            c = width
    return units


def _check_shape(input_shape):
    if input_shape is None or len(input_shape) != 3:
        raise ValueError(f"vanilla-cnn needs input_shape (C, H, W), got {input_shape!r}")


@register_model("al-vanilla-cnn", paper="Kao & Chen 2021, Sec. 5.2",
                summary="associated-learning vanilla CNN: 8 convs (32, 64) in 4 components, dense t-side 256")
def al_vanilla_cnn(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, activation: str = "elu",
                   width: int = 256, **options) -> AssociatedNet:
    """``spec``: conv widths, default ``32-64`` (four convs each)."""
    _check_shape(input_shape)
    units = vanilla_units(input_shape, spec or "32-64", activation)
    return fold(units, input_shape=input_shape, num_classes=num_classes, width=width,
                default_sizes=[2] * (len(units) // 2), **options)


@register_model("vanilla-cnn", summary="BP twin of al-vanilla-cnn: 8 convs, FC 1280-256 (bridge), 3 FC 256, FC C",
                paper="Kao & Chen 2021, Sec. 5.2")
def vanilla_cnn(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, activation: str = "relu",
                width: int = 256, **options) -> BlockNet:
    _check_shape(input_shape)
    units = vanilla_units(input_shape, spec or "32-64", activation)
    return unfold(units, input_shape=input_shape, num_classes=num_classes, width=width,
                  default_sizes=[2] * (len(units) // 2), activation=activation, **options)
