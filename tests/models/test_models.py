import pytest
import torch
from torch import nn

import creditflow as cf


@pytest.mark.parametrize("spec,shape,options", [
    ("mlp:784-64-32-10", (1, 28, 28), {"input_shape": (1, 28, 28)}),
    ("mlp:784-64-32-10", (784,), {}),
    ("conv3", (3, 32, 32), {"fc": "64-32", "num_classes": 100}),
    ("conv3-bn", (3, 32, 32), {"downsample": "maxpool"}),
    ("conv3:8-8-8", (1, 28, 28), {"input_shape": (1, 28, 28), "fc": "16-16"}),
])
def test_every_model_is_blocks_plus_a_head(spec, shape, options):
    model = cf.models.build(spec, **options)
    assert isinstance(model, nn.Sequential) and len(model) >= 2
    logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, options.get("num_classes", 10))
    assert tuple(model.input_shape) == shape


def test_conv3_layout_follows_the_paper():
    model = cf.models.build("conv3-bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((5, 5), (2, 2), (2, 2))] * 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in cf.models.build("conv3").modules())


def test_mlp_activation_option():
    model = cf.models.build("mlp:4-3-2", activation="tanh")
    assert isinstance(model[0][-1], nn.Tanh)
    with pytest.raises(ValueError, match="unknown activation 'tanhh'; available: .*tanh"):
        cf.models.build("mlp:4-3-2", activation="tanhh")


def test_mlp_linear_and_batch_norm_options():
    """The FoA thesis's Table 3.1 networks: 784-10-10-10 linear, and with BatchNorm + ReLU."""
    linear = cf.models.build("mlp:784-10-10-10", activation="identity", bias=False)
    x = torch.randn(5, 784)
    product = linear[2].weight @ linear[1][0].weight @ linear[0][1].weight
    torch.testing.assert_close(linear(x), x @ product.T)  # one linear map, no bias
    bn = cf.models.build("mlp:784-10-10-10", batch_norm=True)
    assert [type(m).__name__ for m in bn[1]] == ["Linear", "BatchNorm1d", "ReLU"] and bn[0][1].bias is not None
    assert isinstance(bn[2], nn.Linear) and sum(isinstance(m, nn.BatchNorm1d) for m in bn.modules()) == 2


@pytest.mark.parametrize("spec,options,match", [
    ("mlp:784-x-10", {}, "expected integers"),
    ("mlp:784-10", {}, "at least one hidden"),
    ("mlp:784-32-10", {"num_classes": 100}, "does not match the dataset's 100 classes"),
    ("mlp:784-32-10", {"input_shape": (3, 32, 32)}, "does not match input shape"),
    ("conv3:8-8", {}, "3 channel counts"),
    ("conv3", {"downsample": "avg"}, "unknown downsample 'avg'"),
    ("resnet", {}, "unknown model 'resnet'"),
    ("mlp:784-32-10", {"depth": 3}, "bad options for model 'mlp'"),
])
def test_bad_specs_say_what_is_allowed(spec, options, match):
    with pytest.raises(ValueError, match=match):
        cf.models.build(spec, **options)


def test_an_mlp_takes_he_normal_init():
    torch.manual_seed(0)
    net = cf.models.build("mlp:784-2048-10", init="he-normal")
    w = net[0][1].weight
    assert abs(w.std().item() - (2 / 784) ** 0.5) < 0.002 and net[0][1].bias.abs().max() == 0
    torch.manual_seed(0)
    default = cf.models.build("mlp:784-2048-10")  # torch: uniform in +-1/sqrt(fan_in)
    assert default[0][1].weight.abs().max() <= 1 / 784 ** 0.5
    with pytest.raises(ValueError, match="unknown init 'xavier'; available: torch, he-normal"):
        cf.models.build("mlp:784-16-10", init="xavier")
