import pytest
import torch
from torch import nn

import creditflow as cf
from creditflow.models.resnet import BasicBlock


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def full_size(name, **options):
    with torch.device("meta"):  # shapes only: skips initialising 11M+ weights
        return cf.models.build(name, **options)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet18-nsc"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64)])
@pytest.mark.parametrize("classes", [10, 100])
def test_resnet_logits_shape(name, shape, classes):
    model = cf.models.build(name, input_shape=shape, num_classes=classes, width=4)
    assert isinstance(model, cf.models.BlockNet) and tuple(model.input_shape) == shape
    assert model(torch.randn(2, *shape)).shape == (2, classes)


@pytest.mark.parametrize("name,depths", [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3)),
                                         ("resnet18-nsc", (2, 2, 2, 2))])
def test_one_child_per_residual_block(name, depths):
    model = cf.models.build(name, width=4)
    assert len(model) == 1 + sum(depths) + 1  # stem, BasicBlocks, head: resnet18 has 10
    assert not isinstance(model[0], BasicBlock) and isinstance(model[0][0], nn.Conv2d)
    assert all(isinstance(b, BasicBlock) for b in list(model)[1:-1])
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].out_features == 10
    # Stage widths w, 2w, 4w, 8w; the first block of stages 2-4 halves the map.
    strides = [b.conv1.stride[0] for b in list(model)[1:-1]]
    firsts = [sum(depths[:k]) for k in range(1, 4)]
    assert strides == [2 if i in firsts else 1 for i in range(sum(depths))]
    assert model[-2].conv2.out_channels == 32


def test_resnet18_parameter_counts():
    # The CIFAR ResNet-18 (3x3 stem, no max-pool, 1x1-conv shortcuts) of kuangliu/pytorch-cifar
    # has 11,173,962 parameters on CIFAR-10; resnet34 the same code's 21,282,122.
    assert n_params(full_size("resnet18")) == 11_173_962
    assert n_params(full_size("resnet34")) == 21_282_122
    assert n_params(full_size("resnet18", num_classes=100)) == 11_173_962 + 90 * 513
    # No skip connections: minus the three 1x1 conv + BN shortcuts (64->128, 128->256, 256->512).
    shortcuts = sum(c * 2 * c + 2 * (2 * c) for c in (64, 128, 256))
    assert n_params(full_size("resnet18-nsc")) == 11_173_962 - shortcuts == 11_000_138
    assert n_params(full_size("resnet18", input_shape=(3, 64, 64), num_classes=200)) == 11_271_432


def test_stem_stride_follows_the_input_size():
    def stem_stride(**options):
        return cf.models.build("resnet18", width=4, **options)[0][0].stride[0]

    assert stem_stride(input_shape=(3, 32, 32)) == 1
    assert stem_stride(input_shape=(1, 28, 28)) == 1
    assert stem_stride(input_shape=(3, 64, 64)) == 2  # TinyImageNet: stage 1 sees 32x32, as on CIFAR
    assert stem_stride(input_shape=(3, 64, 64), stem_stride=1) == 1
    model = cf.models.build("resnet18", width=4, input_shape=(3, 64, 64))
    assert model[0](torch.randn(1, 3, 64, 64)).shape == (1, 4, 32, 32)
    # Parameter count does not depend on the input size.
    assert n_params(model) == n_params(cf.models.build("resnet18", width=4))


def test_shortcuts():
    model = cf.models.build("resnet18", width=4)
    kinds = [type(b.shortcut).__name__ for b in list(model)[1:-1]]
    assert kinds == ["Identity", "Identity", "Sequential", "Identity"] + ["Sequential", "Identity"] * 2
    conv, bn = model[3].shortcut
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)

    plain = cf.models.build("resnet18-nsc", width=4)
    assert all(b.shortcut is None for b in list(plain)[1:-1])
    assert not any("shortcut" in name for name, _ in plain.named_modules())
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in plain.modules())
    # Without the skip, a block is conv-bn-relu-conv-bn-relu: zeroing conv2 zeroes the output.
    block = plain[1].eval()
    nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(block.bn2.bias)
    assert torch.count_nonzero(block(torch.randn(2, 4, 8, 8))) == 0


@pytest.mark.parametrize("spec,options,match", [
    ("resnet18", {"num_classes": 0}, "resnet18 num_classes must be a positive integer, got 0"),
    ("resnet34", {"num_classes": 2.5}, "num_classes must be a positive integer"),
    ("resnet18", {"input_shape": (32, 32)}, r"needs input_shape \(C, H, W\)"),
    ("resnet18", {"input_shape": (3, 0, 32)}, r"needs input_shape \(C, H, W\) of positive integers"),
    ("resnet18-nsc", {"width": 0}, "resnet18-nsc width must be a positive integer"),
    ("resnet18", {"stem_stride": 3}, "stem_stride must be 1 or 2"),
    ("resnet18:64", {}, "resnet18 takes no ':' details"),
    ("resnet18", {"depth": 3}, "bad options for model 'resnet18'"),
    ("resnet19", {}, r"unknown model 'resnet19'.*\(closest: resnet18"),
])
def test_bad_options_say_what_is_allowed(spec, options, match):
    with pytest.raises(ValueError, match=match):
        cf.models.build(spec, **options)
