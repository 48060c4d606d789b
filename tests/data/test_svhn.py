"""SVHN .mat files: layout (32, 32, 3, N), label 10 meaning the digit 0."""

import sys

import numpy as np
import pytest
import torch

import creditflow as cf
from creditflow.data import DatasetError

scipy_io = pytest.importorskip("scipy.io")


def _write(folder, n=(12, 5), seed=0):
    r = np.random.default_rng(seed)
    out = []
    for name, count in zip(("train", "test"), n):
        x = r.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
        y = (np.arange(count) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 1..10
        scipy_io.savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y})
        out += [x, y]
    return out


def test_loads_and_maps_label_10_to_0(tmp_path):
    train_x, train_y, test_x, test_y = _write(tmp_path)
    splits = cf.data.load("svhn", data_dir=tmp_path, download=False, val_fraction=0)
    assert splits.shape == (3, 32, 32) and splits.train.images.dtype == torch.uint8
    n, c, h, w = 7, 2, 5, 30
    assert splits.train.images[n, c, h, w] == train_x[h, w, c, n]
    assert torch.equal(splits.test.images, torch.from_numpy(test_x.transpose(3, 2, 0, 1).copy()))
    assert splits.train.labels.tolist() == [d % 10 for d in train_y.ravel()]
    assert 0 in splits.train.labels.tolist() and splits.train.labels.max() == 9


def test_wrong_shape(tmp_path):
    _write(tmp_path)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1))})
    expected = r"test_32x32.mat: X is uint8 \(28, 28, 1, 2\), expected uint8 \(32, 32, 3, N\)"
    with pytest.raises(DatasetError, match=expected):
        cf.data.load("svhn", data_dir=tmp_path, download=False)


def test_bad_labels_and_missing_variable(tmp_path):
    _write(tmp_path)
    x = np.zeros((32, 32, 3, 2), np.uint8)
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[3], [11]])})
    with pytest.raises(DatasetError, match=r"labels must be in 1..10 \(10 = digit 0\), found 3..11"):
        cf.data.load("svhn", data_dir=tmp_path, download=False)
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x})
    with pytest.raises(DatasetError, match=r"train_32x32.mat has no 'y' variable"):
        cf.data.load("svhn", data_dir=tmp_path, download=False)


def test_corrupt_file(tmp_path):
    _write(tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB garbage" * 10)
    with pytest.raises(DatasetError, match=r"cannot read SVHN file .*train_32x32.mat"):
        cf.data.load("svhn", data_dir=tmp_path, download=False)


def test_missing_scipy_names_the_extra(tmp_path, monkeypatch):
    _write(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes 'from scipy.io import' fail
    with pytest.raises(ImportError, match=r"pip install creditflow\[svhn\]"):
        cf.data.load("svhn", data_dir=tmp_path, download=False)
