"""The AlexNet-style CNN of the ASAP thesis (Woo 2023, Sec. 5.1.3)."""

from __future__ import annotations

from torch import nn

from ..registry import register_model
from .blocks import BlockNet, classifier, parse_dims


def alexnet(spec: str = "", *, input_shape=(3, 32, 32), num_classes: int = 10, fc: str = "1024-1024",
            batch_norm: bool = False, head: str = "linear") -> BlockNet:
    """``64 Conv3x3 - 128 Conv3x3 - 256 Conv3x3 - 1024 FC - 1024 FC - C FC`` (6 blocks).

    Convs have stride 1 and padding 2 (as the thesis states), each followed by ReLU and a 2x2
    max-pool of stride 2. The thesis lists no pooling; without it the first FC layer of a
    32x32 input would take 256*38*38 inputs, so we assume AlexNet's usual pooling after each conv.
    Map sizes: 28 -> 15 -> 8 -> 5, 32 -> 17 -> 9 -> 5, 64 -> 33 -> 17 -> 9.
    ``spec`` overrides the conv channels (``"64-128-256"``), ``fc`` the hidden FC widths.
    ``batch_norm=True`` puts BatchNorm after every layer, the logits included, as the authors' code
    (``code/convnet.py``) does; the thesis's text names none. ``head="fa-bn"``: the authors'
    classifier, a Linear whose error reaches the body through a fixed ``B ~ U(-1, 1)`` under every
    rule, then BatchNorm1d (:data:`~creditflow.models.blocks.HEADS`).
    """
    channels = parse_dims(spec or "64-128-256", "alexnet-asap channels")
    widths = parse_dims(fc, "alexnet-asap fc widths")
    c, h, w = input_shape
    blocks: list[nn.Module] = []
    for c_out in channels:
        norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
        blocks.append(nn.Sequential(nn.Conv2d(c, c_out, 3, stride=1, padding=2), *norm, nn.ReLU(), nn.MaxPool2d(2, 2)))
        c, h, w = c_out, (h + 2) // 2, (w + 2) // 2
    d = c * h * w
    for i, width in enumerate(widths):
        norm = [nn.BatchNorm1d(width)] if batch_norm else []
        blocks.append(nn.Sequential(*([nn.Flatten()] if i == 0 else []), nn.Linear(d, width), *norm, nn.ReLU()))
        d = width
    logits = classifier(d, num_classes, head, batch_norm)
    blocks.append(nn.Sequential(*logits) if len(logits) > 1 else logits[0])
    net = BlockNet(blocks, input_shape)
    # Activation sharing as the authors' code (code/convnet.py) lays it out: the convs after the frozen
    # first share (one group at k = 2: conv3 reads conv2's input, the pooled stem output); the fully
    # connected classifier reads its own inputs (FA-like).
    fc = [f"{len(channels) + i}.{1 if i == 0 else 0}" for i in range(len(widths))]
    fc.append(f"{len(blocks) - 1}.0" if len(logits) > 1 else str(len(blocks) - 1))
    net.activation_sharing = {"own_input": fc}
    return net


@register_model("alexnet-asap", summary="3 conv (3x3, pad 2) + max-pool blocks, 2 FC 1024, linear head",
                paper="Woo 2023 (ASAP thesis), Sec. 5.1.3")
def alexnet_asap(spec: str = "", **options) -> BlockNet:
    return alexnet(spec, **options)
