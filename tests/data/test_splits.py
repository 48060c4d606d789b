"""Stratified, seeded validation hold-out; Splits.normalize; ImageSet; batches."""

import pytest
import torch

import creditflow as cf
from creditflow.data import ImageSet, batches
from creditflow.data.splits import Official, split_official, stratified_holdout


def _labels():
    return torch.repeat_interleave(torch.arange(3), torch.tensor([10, 20, 30]))[torch.randperm(60)]


def test_holdout_is_stratified_disjoint_and_complete():
    labels = _labels()
    train, val = stratified_holdout(labels, 0.1, seed=0)
    assert torch.bincount(labels[val], minlength=3).tolist() == [1, 2, 3]
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(60))


def test_holdout_is_deterministic_per_seed_and_differs_across_seeds():
    labels = _labels()
    a = stratified_holdout(labels, 0.2, seed=3)[1]
    assert torch.equal(a, stratified_holdout(labels, 0.2, seed=3)[1])
    assert not torch.equal(a, stratified_holdout(labels, 0.2, seed=4)[1])


def test_zero_fraction_gives_empty_val():
    train, val = stratified_holdout(_labels(), 0.0, seed=0)
    assert len(val) == 0 and len(train) == 60


@pytest.mark.parametrize("bad", [1.0, -0.1, 2, "half", None])
def test_bad_fraction_names_range(bad):
    with pytest.raises(ValueError, match=r"val_fraction must be .*\[0, 1\)"):
        cf.data.load("fashion-mnist-mini", val_fraction=bad)


def test_load_split_matches_protocol():
    a = cf.data.load("fashion-mnist-mini", val_fraction=0.25, seed=1)
    b = cf.data.load("fashion-mnist-mini", val_fraction=0.25, seed=1)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert torch.bincount(a.val.labels).tolist() == [200] * 10
    assert len(a.train) + len(a.val) == 8000


def _official(n=40, c=3):
    images = torch.randint(0, 256, (n, c, 4, 4), dtype=torch.uint8)
    labels = torch.arange(n) % 4
    return Official(ImageSet(images, labels), ImageSet(images[:8], labels[:8]), 4,
                    (0.5, 0.25, 0.75)[:c], (0.2, 0.1, 0.3)[:c])  # fmt: skip


def test_normalize_formula_devices_and_shapes():
    splits = split_official("toy", _official(), 0.25, 0)
    x = splits.train.images
    mean, std = torch.tensor([0.5, 0.25, 0.75]).view(3, 1, 1), torch.tensor([0.2, 0.1, 0.3]).view(3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    out = splits.normalize(x)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(splits.normalize(x[0]), expected[0], atol=1e-5)  # one (C, H, W) image
    assert torch.allclose(splits.normalize(x.float()), expected, atol=1e-5)  # float in pixel units
    assert splits.shape == (3, 4, 4) and splits.name == "toy"


def test_imageset_checks_and_moves():
    with pytest.raises(ValueError, match="uint8 tensor"):
        ImageSet(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    s = ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    moved = s.to("cpu")
    assert moved is not s and len(moved) == 2


def test_batches_cover_once_and_repeat_with_the_seed():
    data = ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(10))
    seen = [y for _, y in batches(data, 3, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert [len(y) for y in seen] == [3, 3, 3, 1]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
    again = [y for _, y in batches(data, 3, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert torch.equal(torch.cat(seen), torch.cat(again))
    assert torch.equal(torch.cat(seen), torch.randperm(10, generator=torch.Generator().manual_seed(0)))
    plain = list(batches(data, 4, shuffle=False, drop_last=True))
    assert [y.tolist() for _, y in plain] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(torch.equal(x.view(-1), y.to(torch.uint8)) for x, y in plain)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(data, 0, shuffle=False))
