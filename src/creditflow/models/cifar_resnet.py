"""CIFAR ResNet-20/32 (He et al. 2016, Sec. 4.2), folded for Associated Learning and unfolded for BP.

Encoder (Kao & Chen 2021, Sec. 5.2, layout of the authors' ``ResNet_AL``): a 3x3 stem conv of 16
channels + BN + activation, then three stages of ``n`` basic blocks (16, 32, 64 channels; the
first block of stages 2 and 3 has stride 2), ``n = 3`` for ResNet-20 and 5 for ResNet-32. AL
folds it into 4 components: f_1 = stem, f_2..f_4 = one stage each. t_i has 300 units; each bridge
flattens s_i whole (no pooling, as the authors' code: 64 x 8 x 8 = 4096 inputs for the last one)
into FC 1500 and FC 300.

``resnet20``/``resnet32`` (BP) are that inference path with ReLU: stem, stages, flatten, FC 1500,
FC 300 (the extra layers matching the last bridge), three FC 300 (h_4..h_2) and a linear head.
Unlike the textbook ResNet they have no global average pool: the authors' BP ResNet pools to 64
features before its FC 1500, so its parameters would not match AL's (Sec. 5.1 says they do).

A block is ``act(bn2(conv2(act(bn1(conv1 h)))) + shortcut(h))``; the shortcut is the identity, or
a 1x1 conv + BN where the shape changes (option B). The authors' code instead applies the
activation before the addition as well and uses a 1x1 conv without BN; we keep He et al.'s block.
``components`` regroups the ``1 + 3n`` units evenly.
"""

from __future__ import annotations

from torch import nn

from ..registry import register_model
from .associated import AssociatedNet, fold, unfold
from .blocks import BlockNet
from .blocks import activation as make_activation
from .resnet import BasicBlock


def resnet_units(n: int, input_shape, activation: str, base: int = 16) -> list[nn.Module]:
    if input_shape is None or len(input_shape) != 3:
        raise ValueError(f"CIFAR ResNets need input_shape (C, H, W), got {input_shape!r}")
    make_activation(activation)
    units: list[nn.Module] = [nn.Sequential(nn.Conv2d(input_shape[0], base, 3, padding=1, bias=False),
                                            nn.BatchNorm2d(base), make_activation(activation))]
    c = base
    for stage in range(3):
        for i in range(n):
            units.append(BasicBlock(c, base * 2 ** stage, 2 if stage and i == 0 else 1, activation=activation))
            c = base * 2 ** stage
    return units


def _no_spec(name: str, spec: str) -> None:
    if spec:
        raise ValueError(f"{name} takes no ':' details, got {spec!r}; use options, e.g. width=300")


def _al(name: str, n: int, spec: str, input_shape, num_classes, activation, width, options) -> AssociatedNet:
    _no_spec(name, spec)
    return fold(resnet_units(n, input_shape, activation), input_shape=input_shape, num_classes=num_classes,
                width=width, default_sizes=[1, n, n, n], **options)


def _bp(name: str, n: int, spec: str, input_shape, num_classes, activation, width, options) -> BlockNet:
    _no_spec(name, spec)
    return unfold(resnet_units(n, input_shape, activation), input_shape=input_shape, num_classes=num_classes,
                  width=width, default_sizes=[1, n, n, n], activation=activation, **options)


@register_model("al-resnet20", paper="Kao & Chen 2021, Sec. 5.2; He et al. 2016",
                summary="associated-learning ResNet-20: stem + 3 stages of 3 blocks as 4 components, t-side 300")
def al_resnet20(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, activation: str = "elu",
                width: int = 300, **options) -> AssociatedNet:
    return _al("al-resnet20", 3, spec, input_shape, num_classes, activation, width, options)


@register_model("al-resnet32", paper="Kao & Chen 2021, Sec. 5.2; He et al. 2016",
                summary="associated-learning ResNet-32: stem + 3 stages of 5 blocks as 4 components, t-side 300")
def al_resnet32(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, activation: str = "elu",
                width: int = 300, **options) -> AssociatedNet:
    return _al("al-resnet32", 5, spec, input_shape, num_classes, activation, width, options)


@register_model("resnet20", paper="Kao & Chen 2021, Sec. 5.2; He et al. 2016",
                summary="BP twin of al-resnet20: CIFAR ResNet-20 + FC 1500-300 (bridge) + 3 FC 300, no global pool")
def resnet20(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, activation: str = "relu",
             width: int = 300, **options) -> BlockNet:
    return _bp("resnet20", 3, spec, input_shape, num_classes, activation, width, options)


@register_model("resnet32", paper="Kao & Chen 2021, Sec. 5.2; He et al. 2016",
                summary="BP twin of al-resnet32: CIFAR ResNet-32 + FC 1500-300 (bridge) + 3 FC 300, no global pool")
def resnet32(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, activation: str = "relu",
             width: int = 300, **options) -> BlockNet:
    return _bp("resnet32", 5, spec, input_shape, num_classes, activation, width, options)
