"""The AL architectures of Kao & Chen 2021 (Sec. 5) and their matched BP networks."""

import math

import pytest
import torch
from torch import nn

import creditflow as cf
from creditflow.models.associated import AssociatedNet

SMALL = {"width": 8, "bridge_width": 16}  # the label side and bridges small: fast to build
PAIRS = [("al-vanilla-cnn", "vanilla-cnn"), ("al-vgg", "vgg"), ("al-resnet20", "resnet20"), ("al-resnet32", "resnet32")]


def count(module):
    return sum(p.numel() for p in module.parameters())


def linear_shapes(module):
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("al,bp", PAIRS)
def test_matched_bp_network_has_the_al_inference_networks_parameters(al, bp):
    torch.manual_seed(0)
    folded = cf.models.build(al, input_shape=(3, 32, 32), num_classes=10, **SMALL)
    unfolded = cf.models.build(bp, input_shape=(3, 32, 32), num_classes=10, **SMALL)
    assert isinstance(folded, AssociatedNet) and isinstance(unfolded, cf.models.BlockNet)
    assert count(folded.inference_model()) == count(unfolded) < count(folded)
    x = torch.randn(2, 3, 32, 32)
    folded.eval()
    out = folded(x)
    assert out.shape == unfolded(x).shape == (2, 10) and ((0 < out) & (out < 1)).all()  # sigmoid h_1
    # BP layer for AL layer: same shapes, in order (the head stands in for h_1).
    shapes = [tuple(p.shape) for p in folded.inference_model().parameters()]
    assert shapes == [tuple(p.shape) for p in unfolded.parameters()]


def test_paper_layouts():
    mlp = cf.models.build("al-mlp", input_shape=(1, 28, 28), num_classes=10)  # Sec. 5.2 MNIST MLP
    bp_mlp = cf.models.build("mlp:784-1024-1024-5120-1024-1024-10")
    assert len(mlp) == 2 and count(mlp.inference_model()) == count(bp_mlp)
    assert linear_shapes(mlp.components[1].b) == [(5120, 1024), (1024, 5120)]
    assert isinstance(mlp.f[0][0][-1], nn.ELU)
    assert isinstance(mlp.h[0][-1], nn.Sigmoid) and isinstance(mlp.b[0][1][-1], nn.Sigmoid)
    # Vanilla CNN: 13 hidden layers + output = 8 convs, FC 1280, 4 x FC 256, FC 10.
    cnn = cf.models.build("vanilla-cnn")
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(32, 1)] * 3 + [(32, 2)] + [(64, 1)] * 3 + [(64, 2)]
    assert linear_shapes(cnn) == [(1280, 4096), (256, 1280), (256, 256), (256, 256), (256, 256), (10, 256)]
    vgg = cf.models.build("al-vgg", **SMALL)
    assert [len(f) for f in vgg.f] == [2, 2, 2, 2]
    assert [sum(isinstance(m, nn.Conv2d) for m in f.modules()) for f in vgg.f] == [2, 2, 2, 0]
    resnet = cf.models.build("al-resnet32", **SMALL)
    assert [len(f) for f in resnet.f] == [1, 5, 5, 5]
    assert linear_shapes(resnet.components[-1].b)[0] == (16, 64 * 8 * 8)  # whole map, no pooling


def test_number_of_components_is_an_option():
    assert len(cf.models.build("al-mlp:784-32-10")) == 1  # Tables 5-6: 1 to 3 components
    assert len(cf.models.build("al-mlp:784-32-32-32-10")) == 3
    cnn = cf.models.build("al-vanilla-cnn", components=8, **SMALL)
    assert [len(f) for f in cnn.f] == [1] * 8
    assert [len(f) for f in cf.models.build("al-resnet20", components=3, **SMALL).f] == [4, 3, 3]
    widths = cf.models.build("al-mlp:784-32-16-10", label_widths="12-6", bridge_depth=2, bridge_width=7)
    assert linear_shapes(widths.components[1].b) == [(7, 16), (7, 7), (6, 7)]
    assert linear_shapes(widths.components[1].g) == [(6, 12)] and linear_shapes(widths.components[0].h) == [(10, 12)]
    pooled = cf.models.build("al-vanilla-cnn", bridge_pool=2, **SMALL)
    assert linear_shapes(pooled.components[0].b)[0] == (16, 32 * 2 * 2)


def test_he_normal_init():
    torch.manual_seed(0)
    net = cf.models.build("al-mlp:784-1024-10")
    w = net.f[0][0][1].weight
    assert abs(w.std().item() / math.sqrt(2 / 784) - 1) < 0.02  # 802,816 draws
    assert all(torch.count_nonzero(m.bias) == 0 for m in net.modules() if isinstance(m, nn.Linear))
    torch_init = cf.models.build("al-mlp:784-1024-10", init="torch")
    assert torch.count_nonzero(torch_init.f[0][0][1].bias) > 0


@pytest.mark.parametrize("spec,options,match", [
    ("al-mlp:784-32-10", {"num_classes": 100}, "does not match the dataset's 100 classes"),
    ("al-mlp:784-32-10", {"input_shape": (3, 32, 32)}, "does not match input shape"),
    ("al-mlp:784-10", {}, "at least one component width"),
    ("al-mlp:784-32-32-10", {"label_widths": "8"}, r"one width per component \(2\)"),
    ("al-mlp:784-32-10", {"bridge_activation": "sigmoidd"}, "unknown activation 'sigmoidd'"),
    ("al-mlp:784-32-10", {"bridge_depth": -1}, "bridge_depth must be an integer >= 0"),
    ("al-mlp:784-32-10", {"init": "xavier"}, "unknown init 'xavier'; available: torch, he-normal"),
    ("al-vanilla-cnn", {"components": 9}, "components must be an integer from 1 to 8"),
    ("al-vgg:x", {}, "al-vgg takes no ':' details"),
    ("al-vgg", {"input_shape": (1, 8, 8)}, "under 16x16"),
    ("vgg", {"bridge_activation": "relu"}, "bad options for model 'vgg'"),
])
def test_bad_options_say_what_is_allowed(spec, options, match):
    with pytest.raises(ValueError, match=match):
        cf.models.build(spec, **options)
