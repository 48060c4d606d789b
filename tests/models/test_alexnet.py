import pytest
import torch
from torch import nn

import creditflow as cf


@pytest.mark.parametrize("shape,flat", [((1, 28, 28), 256 * 5 * 5), ((3, 32, 32), 256 * 5 * 5),
                                        ((3, 64, 64), 256 * 9 * 9)])
def test_alexnet_asap_sizes(shape, flat):
    model = cf.models.build("alexnet-asap", input_shape=shape, num_classes=7)
    assert isinstance(model, cf.models.BlockNet) and len(model) == 6 and model.input_shape == shape
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (64, (3, 3), (1, 1), (2, 2)), (128, (3, 3), (1, 1), (2, 2)), (256, (3, 3), (1, 1), (2, 2))]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(flat, 1024), (1024, 1024), (1024, 7)]
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_alexnet_asap_small_variant_and_bad_spec():
    model = cf.models.build("alexnet-asap:4-6-8", fc="16-12", input_shape=(3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="expected integers"):
        cf.models.build("alexnet-asap:4-x")
