import torch
from torch import nn

from creditflow.mechanisms import BoundaryCut, block_output_shapes, probe_batch


def net():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                          nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5)), nn.Linear(5, 2))
    model[0][1].eval()  # kept in eval on purpose (frozen statistics): a probe must not switch it back
    return model


def test_probe_batch_sits_beside_the_parameters():
    model = net().double()
    x = probe_batch(model, (3, 8, 8))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float64 and not x.any()
    assert probe_batch(list(model), (3, 8, 8), batch=5).shape == (5, 3, 8, 8)
    assert probe_batch(nn.ReLU(), (4,)).dtype == torch.get_default_dtype()  # no parameters


def test_shape_probes_leave_modes_and_statistics_alone():
    model = net()
    modes = [m.training for m in model.modules()]
    stats = model[0][1].running_mean.clone()
    assert block_output_shapes(list(model)[:-1], (3, 8, 8)) == [(4, 6, 6), (5,)]
    assert BoundaryCut(model, ["0", "1"]).probe((3, 8, 8)).shapes == [(4, 6, 6), (5,)]
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0][1].running_mean, stats)
