"""Compact saved activations: the same gradients as PyTorch's modules, fewer bytes kept."""

import copy

import pytest
import torch
from torch import nn

from creditflow.diagnostics import saved_tensor_bytes
from creditflow.mechanisms.compact import (
    CompactBatchNorm2d,
    IndexMaxPool2d,
    MaskReLU,
    compact_activations,
)


def grads(module: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """Input and parameter gradients of ``sum(weight * module(x))``."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    (module(x) * weight).sum().backward()
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("shape", [(4, 5, 6), (3, 7), (2, 8, 4, 4)])  # 120, 21 (padded), 256 elements
def test_mask_relu_is_relu_bit_for_bit_and_keeps_one_bit_per_element(shape):
    x = torch.randn(*shape)
    x.view(-1)[:3] = 0.0  # ReLU's derivative at 0 is 0 in PyTorch; the mask must agree
    w = torch.randn(*shape)
    assert torch.equal(grads(MaskReLU(), x, w)[0], grads(nn.ReLU(), x, w)[0])
    x.requires_grad_()
    held = saved_tensor_bytes(lambda: MaskReLU()(x).sum().backward())
    assert held == -(-x.numel() // 8)  # bits, packed eight to a byte, not the 4-byte output
    with torch.no_grad():
        assert torch.equal(MaskReLU()(x), torch.relu(x))


@pytest.mark.parametrize("pool", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=3, stride=2, ceil_mode=True)])
def test_index_max_pool_gives_max_pool_gradients_from_its_positions_alone(pool):
    torch.manual_seed(0)
    x, ref = torch.randn(2, 3, 9, 9, dtype=torch.float64), nn.MaxPool2d(**pool)
    w = torch.randn_like(ref(x))
    torch.testing.assert_close(grads(IndexMaxPool2d(**pool), x, w)[0], grads(ref, x, w)[0], rtol=0, atol=1e-12)
    x32 = torch.randn(2, 3, 9, 9, requires_grad=True)
    held = saved_tensor_bytes(lambda: IndexMaxPool2d(**pool)(x32).sum().backward())
    assert held == 4 * ref(x32).numel()  # int32 positions; the input is not kept


def test_compact_batch_norm_normalized_matches_batch_norm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.normal_()
    ours = copy.deepcopy(ref)
    compact_activations(nn.Sequential(ours), relu_mask=False, saved_norm="normalized")
    model = nn.Sequential(copy.deepcopy(ref))
    compact_activations(model, relu_mask=False, saved_norm="normalized")
    assert isinstance(model[0], CompactBatchNorm2d)
    for _ in range(2):  # twice: running statistics and num_batches_tracked move identically
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1
        w = torch.randn_like(x)
        for a, b in zip(grads(model, x, w), grads(ref, x, w)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(model[0].state_dict()[key], value)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x))


def test_compact_batch_norm_bfloat16_halves_the_bytes_and_stays_close():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(8, momentum=None)
    model = nn.Sequential(copy.deepcopy(ref))
    compact_activations(model, relu_mask=False, saved_norm="bfloat16")
    x, w = torch.randn(16, 8, 6, 6), torch.randn(16, 8, 6, 6)
    for a, b in zip(grads(model, x, w), grads(ref, x, w)):
        assert torch.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    xg = x.clone().requires_grad_()
    ours, theirs = (saved_tensor_bytes(lambda: m(xg).sum().backward(), exclude=m) for m in (model, ref))
    assert ours == 2 * x.numel() + 4 * 8  # bf16 x_hat plus 1/std per channel
    assert theirs >= 4 * x.numel()
    torch.testing.assert_close(model[0].running_var, ref.running_var)  # forward and statistics exact


def test_compact_activations_keeps_parameters_buffers_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Sequential(nn.Flatten(), nn.Linear(36, 2), nn.ReLU()))
    params, keys = list(model.parameters()), list(model.state_dict())
    buffers = list(model.buffers())
    assert compact_activations(model, saved_norm="bfloat16") == 4
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert [id(b) for b in model.buffers()] == [id(b) for b in buffers]
    assert list(model.state_dict()) == keys
    assert isinstance(model[2], nn.ReLU) and isinstance(model[3], nn.MaxPool2d)  # still the same kinds
    assert compact_activations(nn.Sequential(nn.ReLU()), relu_mask=False) == 0
    with pytest.raises(ValueError, match="unknown saved_norm 'half'; available: input, normalized, bfloat16"):
        compact_activations(model, saved_norm="half")


def test_bits_pack_and_unpack_to_the_same_mask():
    from creditflow.mechanisms.compact import pack_bits, unpack_bits

    for n in (1, 7, 8, 9, 64, 1000):
        mask = torch.rand(n) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
        assert torch.equal(unpack_bits(packed, mask.shape), mask)
