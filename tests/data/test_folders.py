"""CIFAR-10 as image folders (train/<class>/*, test/<class>/*), extracted or tarred, and the cache."""

import os

import numpy as np
import pytest
import torch

import creditflow as cf
from creditflow.data import DatasetError, folders

from .writers import CIFAR10_CLASSES, png_bytes, tar_folder, write_class_folders


def _write(root, **kw):
    train = write_class_folders(root / "train", CIFAR10_CLASSES, seed=1, **kw)
    test = write_class_folders(root / "test", CIFAR10_CLASSES, per_class=1, seed=2)
    return train, test


def _assert_round_trip(splits, train, test):
    assert splits.shape == (3, 32, 32)
    assert torch.equal(splits.train.images, torch.from_numpy(train[0]))
    assert torch.equal(splits.train.labels, torch.from_numpy(train[1]))
    assert torch.equal(splits.test.images, torch.from_numpy(test[0]))
    assert torch.equal(splits.test.labels, torch.from_numpy(test[1]))


def test_extracted_folders_round_trip_in_natural_order(tmp_path):
    # '10.png' must come after '2.png': numbers compare as numbers
    train, test = _write(tmp_path, names=["1.png", "2.png", "10.png"])
    splits = cf.data.load("cifar10", data_dir=tmp_path, download=False, val_fraction=0)
    _assert_round_trip(splits, train, test)
    assert splits.train.labels.tolist()[:4] == [0, 0, 0, 1]


def test_tar_gz_folders_match_extracted(tmp_path):
    train, test = _write(tmp_path / "src")
    (tmp_path / "packed").mkdir()
    tar_folder(tmp_path / "src" / "train", tmp_path / "packed" / "train.tar.gz", "train")
    tar_folder(tmp_path / "src" / "test", tmp_path / "packed" / "test.tar.gz", "test")
    splits = cf.data.load("cifar10", data_dir=tmp_path / "packed", download=False, val_fraction=0)
    _assert_round_trip(splits, train, test)
    assert "train.tar.gz" in splits.origin


def test_jpeg_folders_decode_close(tmp_path):
    from PIL import Image

    ramp = np.add.outer(np.arange(32) * 3, np.arange(32) * 2)  # smooth: JPEG keeps it well
    expected = []
    for label, c in enumerate(CIFAR10_CLASSES):
        pixels = (ramp[..., None] + [0, 30, 60] + 5 * label).astype(np.uint8)  # (32, 32, 3)
        for split in ("train", "test"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(pixels).save(tmp_path / split / c / "0000.jpg", quality=95)
        expected.append(pixels.transpose(2, 0, 1))
    splits = cf.data.load("cifar10", data_dir=tmp_path, download=False, val_fraction=0)
    assert splits.train.images.shape == (10, 3, 32, 32) and splits.train.labels.tolist() == list(range(10))
    error = (splits.train.images.float() - torch.from_numpy(np.stack(expected)).float()).abs().mean()
    assert error < 3


def test_decoded_pixels_are_cached_and_invalidated(tmp_path, monkeypatch):
    train, test = _write(tmp_path)
    first = cf.data.load("cifar10", data_dir=tmp_path, download=False, val_fraction=0)
    cache = list((tmp_path / "user-cache" / "decoded").glob("*.npz"))
    assert len(cache) == 1 and not list(cache[0].parent.glob(".*part"))

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    original = folders.decode_images
    monkeypatch.setattr("creditflow.data.cifar.decode_images", refuse)
    again = cf.data.load("cifar10", data_dir=tmp_path, download=False, val_fraction=0)
    assert torch.equal(first.train.images, again.train.images)

    # replacing an image changes the key: the new pixels are decoded, never the stale ones
    monkeypatch.setattr("creditflow.data.cifar.decode_images", original)
    path = tmp_path / "train" / "cat" / "0.png"
    path.write_bytes(png_bytes(np.full((32, 32, 3), 7, np.uint8)))
    os.utime(path, ns=(1, 1))
    fresh = cf.data.load("cifar10", data_dir=tmp_path, download=False, val_fraction=0)
    assert (fresh.train.images[fresh.train.labels == 3][0] == 7).all()


def test_unreadable_cache_entry_is_rebuilt(tmp_path):
    train, test = _write(tmp_path)
    cf.data.load("cifar10", data_dir=tmp_path, download=False)
    entry = next((tmp_path / "user-cache" / "decoded").glob("*.npz"))
    entry.write_bytes(b"not a zip")
    splits = cf.data.load("cifar10", data_dir=tmp_path, download=False, val_fraction=0)
    _assert_round_trip(splits, train, test)


def test_wrong_image_size(tmp_path):
    _write(tmp_path)
    (tmp_path / "test" / "dog" / "0.png").write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8)))
    with pytest.raises(DatasetError, match=r"image .*test/dog/0.png is 16x16, expected 32x32"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)


def test_corrupt_image(tmp_path):
    _write(tmp_path)
    (tmp_path / "train" / "frog" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"cannot decode image .*train/frog/1.png"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)


def test_unknown_and_missing_class_folders(tmp_path):
    _write(tmp_path)
    (tmp_path / "train" / "zebra").mkdir()
    (tmp_path / "train" / "zebra" / "0.png").write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(DatasetError, match=r"unknown class folder 'zebra' .*expected: airplane, automobile"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)
    (tmp_path / "train" / "zebra" / "0.png").unlink()
    for f in (tmp_path / "train" / "ship").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"no images for class\(es\) ship"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)
