"""Tiny-ImageNet: train/<wnid>/images, val/images + val_annotations.txt, folder or zip."""

import numpy as np
import pytest
import torch

import creditflow as cf
from creditflow.data import DatasetError

from .writers import png_bytes, write_tiny_imagenet, zip_folder


def _check(splits, train_x, train_y, test_x, test_y):
    assert splits.shape == (3, 64, 64) and splits.num_classes == 3
    assert splits.classes == ("n01", "n02", "n03")  # sorted wnids
    assert torch.equal(splits.train.images, torch.from_numpy(train_x))
    assert torch.equal(splits.train.labels, torch.from_numpy(train_y))
    # the official validation set, labelled by val_annotations.txt, is the test split
    assert torch.equal(splits.test.images, torch.from_numpy(test_x))
    assert torch.equal(splits.test.labels, torch.from_numpy(test_y))


def test_folder(tmp_path):
    arrays = write_tiny_imagenet(tmp_path)
    _check(cf.data.load("tiny-imagenet", data_dir=tmp_path, download=False, val_fraction=0), *arrays)


def test_zip(tmp_path):
    arrays = write_tiny_imagenet(tmp_path / "src")
    (tmp_path / "z").mkdir()
    zip_folder(tmp_path / "src" / "tiny-imagenet-200", tmp_path / "z" / "tiny-imagenet-200.zip")
    _check(cf.data.load("tiny-imagenet", data_dir=tmp_path / "z", download=False, val_fraction=0), *arrays)


def test_grayscale_becomes_rgb(tmp_path):
    write_tiny_imagenet(tmp_path)
    gray = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    (tmp_path / "tiny-imagenet-200" / "train" / "n01" / "images" / "n01_0.JPEG").write_bytes(png_bytes(gray))
    splits = cf.data.load("tiny-imagenet", data_dir=tmp_path, download=False, val_fraction=0)
    first = splits.train.images[0]
    assert torch.equal(first[0], torch.from_numpy(gray)) and torch.equal(first[0], first[2])


def test_annotation_errors(tmp_path):
    write_tiny_imagenet(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"bad line 1 in .*val_annotations.txt"):
        cf.data.load("tiny-imagenet", data_dir=tmp_path, download=False)
    annotations.write_text("val_77.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"line 1 names missing file val_77.JPEG"):
        cf.data.load("tiny-imagenet", data_dir=tmp_path, download=False)


def test_wrong_size(tmp_path):
    write_tiny_imagenet(tmp_path)
    path = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG"
    path.write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(DatasetError, match=r"val_1.JPEG is 32x32, expected 64x64"):
        cf.data.load("tiny-imagenet", data_dir=tmp_path, download=False)
