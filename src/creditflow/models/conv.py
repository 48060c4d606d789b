"""Conv3 and Conv3+BN, the small CNNs of Crafton et al. (2019) used in the LAS paper."""

from __future__ import annotations

from torch import nn

from ..registry import register_model
from .blocks import BlockNet, parse_dims

DOWNSAMPLING = ("stride", "maxpool")


def conv_block(c_in: int, c_out: int, batch_norm: bool, downsample: str) -> nn.Sequential:
    # Both variants halve the spatial size: "stride" is the paper's text (5x5 conv, stride 2,
    # padding 2); "maxpool" is the authors' code (stride-1 conv, then 3x3 max-pool, stride 2).
    stride = 2 if downsample == "stride" else 1
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 5, stride=stride, padding=2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    if downsample == "maxpool":
        layers.append(nn.MaxPool2d(3, stride=2, padding=1))
    return nn.Sequential(*layers)


def conv3(spec: str = "", *, batch_norm: bool = False, input_shape=(3, 32, 32),
          num_classes: int = 10, fc: str = "2048-2048", downsample: str = "stride") -> BlockNet:
    """Three conv blocks, then two hidden FC blocks and a linear head (6 blocks).

    The LAS paper gives kernels, strides and padding but not widths; the defaults, conv
    channels ``96-128-256`` (``spec``) and FC widths ``2048-2048`` (``fc``), are those of the
    authors' released code (leibniz21c/direct-feedback-learning-with-local-alignment-support,
    models/bp/conv.py), which downsamples with max-pooling (``downsample="maxpool"``).
    """
    if downsample not in DOWNSAMPLING:
        raise ValueError(f"unknown downsample {downsample!r}; available: {', '.join(DOWNSAMPLING)}")
    channels = parse_dims(spec or "96-128-256", "conv3 channels")
    widths = parse_dims(fc, "conv3 fc widths")
    if len(channels) != 3 or len(widths) != 2:
        raise ValueError(f"conv3 takes 3 channel counts and 2 fc widths, got {channels} and {widths}")
    c, h, w = input_shape
    blocks: list[nn.Module] = []
    for c_out in channels:
        blocks.append(conv_block(c, c_out, batch_norm, downsample))
        c, h, w = c_out, (h + 1) // 2, (w + 1) // 2
    d = c * h * w
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(d, widths[0]), nn.ReLU()))
    blocks.append(nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU()))
    blocks.append(nn.Linear(widths[1], num_classes))
    return BlockNet(blocks, input_shape)


@register_model("conv3", summary="3 conv blocks (5x5, stride 2) + 3 FC layers (Crafton et al.)",
                paper="LAS paper Sec. IV.B")
def conv3_plain(spec: str = "", **options) -> BlockNet:
    return conv3(spec, batch_norm=False, **options)


@register_model("conv3-bn", summary="conv3 with BatchNorm after each convolution",
                paper="LAS paper Sec. IV.B")
def conv3_bn(spec: str = "", **options) -> BlockNet:
    return conv3(spec, batch_norm=True, **options)
