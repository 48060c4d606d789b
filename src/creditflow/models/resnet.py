"""CIFAR-style ResNets as ``BlockNet``s: one residual block per child, for block-wise direct rules.

Children: ``[stem] [stage1.1] [stage1.2] [stage2.1] ... [stage4.2] [head]`` (resnet18: 10).
A direct rule (DFA, DRTP, LAS) cuts the graph at every child's input and injects its signal
at every hidden child's output, so each ``BasicBlock`` back-propagates the signal through its
own conv-bn-relu-conv-bn and shortcut paths only: the block-wise DFA of Launay et al. 2020.

Layout (He et al. 2016, Sec. 4.2 widths; the common CIFAR adaptation, e.g. kuangliu/pytorch-cifar):

- stem: 3x3 conv (stride ``s``, no bias), BN, ReLU; no max-pool.
  ``s = 1`` for inputs under 64 pixels a side (CIFAR, SVHN, MNIST): 32x32 maps in stage 1.
  ``s = 2`` for 64x64 and larger (TinyImageNet): the stem halves 64x64 to 32x32, so every
  later layer runs on CIFAR's map sizes at CIFAR's cost. Keeping stride 1 at 64x64 costs 4x
  the compute and activation memory; the ImageNet stem (7x7 stride 2 + max-pool) would leave
  16x16 maps in stage 1 and 2x2 in stage 4. Override with ``stem_stride``.
- stages of ``BasicBlock``s with widths ``w, 2w, 4w, 8w`` (``w = width``, default 64); the
  first block of stages 2-4 has stride 2. A shortcut that changes width or size is a 1x1 conv
  + BN (option B of the paper), otherwise the identity.
- head: global average pool, flatten, Linear -> logits.

Weights keep PyTorch's default init (Kaiming-uniform with a=sqrt(5) for convs and the Linear,
BN weight 1 and bias 0), as in the reference CIFAR implementations.

References: He et al. 2016 (ResNet); Launay et al. 2020, Sec. 3 (block-wise DFA for ResNets);
the ASAP thesis for ``resnet18-nsc`` (no skip connections).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..registry import register_model
from .blocks import BlockNet, classifier
from .blocks import activation as make_activation


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm that follows has its own.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``act(bn2(conv2(act(bn1(conv1(h))))) + shortcut(h))``; without shortcut, no ``+ shortcut(h)``.

    ``shortcut`` is a 1x1 conv + BN when the block changes width or size, ``nn.Identity``
    otherwise, and absent (``None``) in the no-skip-connection variant. ``activation``: ReLU here
    and in BP's CIFAR ResNets, ELU in Associated Learning's encoders (models/cifar_resnet.py).
    """

    #: for activation sharing: conv1 and the shortcut conv read the block's input (one slot), conv2 the
    #: block's middle activation (rules/activation_sharing.py; ASAP thesis eqs. 5.1-5.3)
    sharing_slots = (("conv1", "shortcut.0"), ("conv2",))

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: bool = True, activation: str = "relu"):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = make_activation(activation)
        self.shortcut: nn.Module | None = None
        if shortcut:
            self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, h: Tensor) -> Tensor:  # h: (N, c_in, H, W) -> (N, c_out, H/stride, W/stride)
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(h)))))
        if self.shortcut is not None:
            out = out + self.shortcut(h)
        return self.act(out)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def resnet(depths: Sequence[int], shortcut: bool = True, *, name: str = "resnet", spec: str = "",
           input_shape=(3, 32, 32), num_classes: int = 10, width: int = 64,
           stem_stride: int | None = None, head: str = "linear") -> BlockNet:
    """A CIFAR-style ResNet of ``BasicBlock``s: stem, ``sum(depths)`` blocks, head, one child each.

    Args:
        depths: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        shortcut: False drops every skip connection (a plain deep CNN).
        name: the registry name, for error messages.
        spec: text after ``name:``; ResNets take none.
        input_shape: ``(C, H, W)`` of one sample.
        num_classes: size of the logits.
        width: channels of the stem and stage 1; stage k has ``width * 2**(k-1)``.
        stem_stride: 1 or 2; None chooses 2 when ``min(H, W) >= 64`` (TinyImageNet), else 1.
        head: ``linear`` (pool, flatten, Linear) or ``fa-bn``: the ASAP authors' classifier, whose
            Linear sends the error through a fixed ``B ~ U(-1, 1)`` under every rule, then
            BatchNorm1d (:data:`~creditflow.models.blocks.HEADS`).
    """
    if spec:
        raise ValueError(f"{name} takes no ':' details, got {spec!r}; use options, e.g. width=16")
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"{name} depths must be positive integers, got {tuple(depths)}")
    if (not isinstance(input_shape, Sequence) or len(input_shape) != 3
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape)):
        raise ValueError(f"{name} needs input_shape (C, H, W) of positive integers, got {input_shape!r}")
    num_classes = _positive_int(num_classes, f"{name} num_classes")
    width = _positive_int(width, f"{name} width")
    c, h, w = input_shape
    if stem_stride is None:
        stem_stride = 2 if min(h, w) >= 64 else 1
    if stem_stride not in (1, 2) or isinstance(stem_stride, bool):
        raise ValueError(f"{name} stem_stride must be 1 or 2 (None: from input_shape), got {stem_stride!r}")

    stem = nn.Sequential(conv3x3(c, width, stem_stride), nn.BatchNorm2d(width), nn.ReLU())
    blocks: list[nn.Module] = [stem]
    c_in = width
    for stage, depth in enumerate(depths):
        c_out = width * 2 ** stage
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(c_in, c_out, stride, shortcut))
            c_in = c_out
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *classifier(c_in, num_classes, head)))
    net = BlockNet(blocks, tuple(input_shape))
    # Activation sharing as eq. 5.3 and the authors' code (code/resnet.py) lay it out: groups of k
    # slots end at a block's conv1, so each group {conv2 of block j-1, conv1 + shortcut of block j}
    # reads block j-1's input x_{j-1}; the first group is block 1's conv1 alone (it reads the stem's
    # output, x_1); the classifier reads its own input.
    net.activation_sharing = {"first_group": 1, "own_input": [f"{len(blocks) - 1}.2"]}
    return net


@register_model("resnet18", summary="CIFAR ResNet-18 (3x3 stem, 2-2-2-2 BasicBlocks), one block per child",
                paper="He et al. 2016; block-wise DFA: Launay et al. 2020")
def resnet18(spec: str = "", **options) -> BlockNet:
    return resnet((2, 2, 2, 2), name="resnet18", spec=spec, **options)


@register_model("resnet34", summary="CIFAR ResNet-34 (3x3 stem, 3-4-6-3 BasicBlocks), one block per child",
                paper="He et al. 2016; block-wise DFA: Launay et al. 2020")
def resnet34(spec: str = "", **options) -> BlockNet:
    return resnet((3, 4, 6, 3), name="resnet34", spec=spec, **options)


@register_model("resnet18-nsc", summary="resnet18 without skip connections (plain 18-layer CNN)",
                paper="He et al. 2016; no-shortcut variant: ASAP thesis")
def resnet18_nsc(spec: str = "", **options) -> BlockNet:
    return resnet((2, 2, 2, 2), shortcut=False, name="resnet18-nsc", spec=spec, **options)
