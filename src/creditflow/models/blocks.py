"""BlockNet: a model as a sequence of blocks whose last block is the head.

Direct rules cut the graph between blocks; sequential rules ignore the grouping.
Any ``nn.Sequential`` whose children are blocks and whose last child produces the
logits works with every rule; ``BlockNet`` only adds ``input_shape`` so rules can
size their feedback without a data batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..mechanisms.feedback import fixed_feedback_linear

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky-relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "identity": nn.Identity,  # a linear network (the FoA thesis's Table 3.1 "linear")
}


def activation(name: str) -> nn.Module:
    """An activation module by name; a typo names the allowed ones."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; available: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


class BlockNet(nn.Sequential):
    """Blocks followed by a head; ``self[-1]`` produces the logits.

    Args:
        blocks: the hidden blocks then the head, in forward order.
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)``.
    """

    def __init__(self, blocks: Sequence[nn.Module], input_shape: tuple[int, ...]):
        super().__init__(*blocks)
        if len(self) < 2:
            raise ValueError(f"a BlockNet needs at least one hidden block and a head, got {len(self)} block(s)")
        self.input_shape = tuple(int(d) for d in input_shape)

    @property
    def head(self) -> nn.Module:
        return self[-1]

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}"


def parse_dims(text: str, what: str) -> list[int]:
    """``"784-1024-10"`` -> ``[784, 1024, 10]`` with a clear error for bad text."""
    try:
        dims = [int(part) for part in text.split("-")]
    except ValueError:
        raise ValueError(f"bad {what} {text!r}; expected integers joined by '-', e.g. 784-1024-10") from None
    if any(d <= 0 for d in dims):
        raise ValueError(f"bad {what} {text!r}; every size must be positive")
    return dims


#: weight initialisations a model may be built with: ``torch`` (each layer's own reset_parameters:
#: for Linear/Conv2d ``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in ``±1/sqrt(fan_in)``, and a
#: uniform bias), or ``he-normal`` (He et al. 2015: normal with ``std = sqrt(2 / fan_in)``, zero biases)
INITS = ("torch", "he-normal")


#: classifiers a model may end in: ``linear`` (a plain Linear, trained by the rule like every other
#: layer) or ``fa-bn`` (the ASAP authors' classifier, code/resnet.py and code/convnet.py: a Linear whose
#: error reaches the body through a fixed ``B ~ U(-1, 1)`` under every rule, then BatchNorm1d on the
#: logits)
HEADS = ("linear", "fa-bn")


def classifier(in_features: int, num_classes: int, head: str = "linear", batch_norm: bool = False) -> list[nn.Module]:
    """The logit layers of a head (one of :data:`HEADS`); ``batch_norm``: BatchNorm1d on the logits
    of a ``linear`` head too (``fa-bn`` always has it)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; available: {', '.join(HEADS)}")
    if head == "fa-bn":
        return [fixed_feedback_linear(in_features, num_classes), nn.BatchNorm1d(num_classes)]
    return [nn.Linear(in_features, num_classes), *([nn.BatchNorm1d(num_classes)] if batch_norm else [])]


def apply_init(module: nn.Module, init: str) -> nn.Module:
    """``module`` with every Linear/Conv2d initialised by ``init`` (one of :data:`INITS`)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; available: {', '.join(INITS)}")
    if init == "he-normal":
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return module
