"""Batch augmentations: each op checked against its definition, seeds, shapes and dtypes."""

import pytest
import torch
import torch.nn.functional as F

from creditflow.data import augment

N = 64


def _images(dtype=torch.uint8, n=N, c=3, size=32):
    x = torch.randint(1, 256, (n, c, size, size), generator=torch.Generator().manual_seed(5))  # no zeros
    return x.to(dtype)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_flip_flips_exactly_the_chosen_samples():
    x = _images()
    out = augment.build("flip")(x, generator=_gen(1))
    chosen = torch.rand(N, generator=_gen(1)) < 0.5
    assert 10 < chosen.sum() < N - 10
    for i in range(N):
        assert torch.equal(out[i], torch.flip(x[i], dims=[-1]) if chosen[i] else x[i])


def test_crop_is_a_window_of_the_zero_padded_input():
    x = _images()
    out = augment.build("crop")(x, generator=_gen(2))
    padded = F.pad(x, (4, 4, 4, 4))
    offsets = set()
    for i in range(N):
        windows = [(dy, dx) for dy in range(9) for dx in range(9)]
        matches = [(dy, dx) for dy, dx in windows if torch.equal(padded[i, :, dy : dy + 32, dx : dx + 32], out[i])]
        assert len(matches) == 1  # images have no zeros, so the window is unique
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets differ per sample


@pytest.mark.parametrize("spec,side", [("cutout", 16), ("cutout8", 8)])
def test_cutout_zeroes_one_square(spec, side):
    x = _images()
    out = augment.build(spec)(x, generator=_gen(3))
    full = 0
    for i in range(N):
        zero = (out[i] == 0).all(dim=0)  # (H, W)
        assert (out[i][:, ~zero] == x[i][:, ~zero]).all()  # everything else untouched
        rows, cols = zero.any(dim=1).nonzero().view(-1), zero.any(dim=0).nonzero().view(-1)
        h, w = len(rows), len(cols)
        assert 1 <= h <= side and 1 <= w <= side and zero.sum() == h * w  # one rectangle
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        if 0 < rows[0] and rows[-1] < 31 and 0 < cols[0] and cols[-1] < 31:  # not clipped
            assert h == w == side
            full += 1
    assert full > 0


def test_cutout_default_is_half_the_side():
    out = augment.build("cutout")(_images(size=28, c=1), generator=_gen(4))
    assert (out == 0).all(dim=1).sum(dim=(1, 2)).max() == 14 * 14


@pytest.mark.parametrize("spec", ["flip", "crop", "cutout", "randaugment", "flip,crop,cutout,randaugment"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_seeded_shape_and_dtype_preserved(spec, dtype):
    x = _images(dtype)
    aug = augment.build(spec)
    a, b = aug(x, generator=_gen(7)), aug(x, generator=_gen(7))
    assert a.shape == x.shape and a.dtype == dtype and a.device == x.device
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, generator=_gen(8)))
    aug(x)  # the global RNG works too


def test_randaugment_keeps_uint8_range_and_leaves_some_samples_alone():
    x = _images()
    out = augment.build("randaugment")(x, generator=_gen(9))
    unchanged = sum(torch.equal(out[i], x[i]) for i in range(N))
    assert 0 < unchanged < N // 2  # identity twice has chance 1/49
    assert out.min() >= 0 and out.max() <= 255


def test_spec_parsing():
    x = _images()
    assert augment.build("none")(x) is x and augment.build("")(x) is x and augment.build([])(x) is x
    assert augment.build(" Flip , crop ").spec == "flip,crop"
    assert augment.build(["flip", "cutout8"]).spec == "flip,cutout8"
    with pytest.raises(ValueError, match=r"^unknown augmentation 'x'; available: crop, cutout, flip, randaugment$"):
        augment.build("flip,x")
    with pytest.raises(ValueError, match="unknown augmentation 'cutout0'"):
        augment.build("cutout0")
    with pytest.raises(ValueError, match=r"batch \(N, C, H, W\)"):
        augment.build("flip")(x[0])
