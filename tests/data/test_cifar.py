"""CIFAR-10 and CIFAR-100 python pickles, as folders and as the official .tar.gz."""

import pickle

import numpy as np
import pytest
import torch

import creditflow as cf
from creditflow.data import DatasetError

from .writers import cifar_pickle, rng, tar_folder, write_bytes, write_cifar10_pickles


def _check(splits, train_x, train_y, test_x, test_y, classes):
    assert splits.shape == (3, 32, 32) and splits.num_classes == classes
    assert splits.train.images.dtype == torch.uint8 and splits.test.labels.dtype == torch.int64
    assert torch.equal(splits.train.images, torch.from_numpy(train_x))
    assert torch.equal(splits.train.labels, torch.from_numpy(np.asarray(train_y)).long())
    assert torch.equal(splits.test.images, torch.from_numpy(test_x))
    assert torch.equal(splits.test.labels, torch.from_numpy(np.asarray(test_y)).long())


def test_cifar10_pickles_folder(tmp_path):
    arrays = write_cifar10_pickles(tmp_path)
    splits = cf.data.load("cifar10", data_dir=tmp_path, download=False, val_fraction=0)
    _check(splits, *arrays, 10)
    assert splits.classes[0] == "airplane" and len(splits.classes) == 10
    # pointing inside the batches folder works too
    inside = cf.data.load("cifar10", data_dir=tmp_path / "cifar-10-batches-py", download=False, val_fraction=0)
    _check(inside, *arrays, 10)


def _tar_batches(tmp_path):
    """<tmp>/d/cifar-10-python.tar.gz made from <tmp>/src/cifar-10-batches-py, as published."""
    source = tmp_path / "src" / "cifar-10-batches-py"
    return tar_folder(source, tmp_path / "d" / "cifar-10-python.tar.gz", "cifar-10-batches-py")


def test_cifar10_official_tar_gz(tmp_path):
    arrays = write_cifar10_pickles(tmp_path / "src")
    (tmp_path / "d").mkdir()
    _tar_batches(tmp_path)
    splits = cf.data.load("cifar10", data_dir=tmp_path / "d", download=False, val_fraction=0)
    _check(splits, *arrays, 10)


def _write_cifar100(folder, n=6):
    r = rng(1)
    out = []
    for name in ("train", "test"):
        x = r.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = r.integers(0, 100, n)
        write_bytes(folder / "cifar-100-python" / name, cifar_pickle(x, y, "fine_labels"))
        out += [x, y]
    return out


def test_cifar100_pickles_and_tar(tmp_path):
    arrays = _write_cifar100(tmp_path / "plain")
    _check(cf.data.load("cifar100", data_dir=tmp_path / "plain", download=False, val_fraction=0), *arrays, 100)
    (tmp_path / "packed").mkdir()
    tar_folder(tmp_path / "plain" / "cifar-100-python", tmp_path / "packed" / "cifar-100-python.tar.gz",
               "cifar-100-python")  # fmt: skip
    splits = cf.data.load("cifar100", data_dir=tmp_path / "packed", download=False, val_fraction=0)
    _check(splits, *arrays, 100)
    assert len(splits.classes) == 100 and splits.classes[:2] == ("apple", "aquarium_fish")


def test_corrupt_pickle(tmp_path):
    write_cifar10_pickles(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"cannot read CIFAR batch .*data_batch_3"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)


def test_wrong_data_shape(tmp_path):
    write_cifar10_pickles(tmp_path)
    small = cifar_pickle(np.zeros((2, 3, 16, 16), np.uint8), [0, 1])
    write_bytes(tmp_path / "cifar-10-batches-py" / "test_batch", small)
    with pytest.raises(DatasetError, match=r"test_batch: data is uint8 \(2, 768\), expected uint8 \(N, 3072\)"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)


def test_missing_key_and_label_range(tmp_path):
    write_cifar10_pickles(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_1 has no 'labels' entry"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)
    batch.write_bytes(cifar_pickle(np.zeros((1, 3, 32, 32), np.uint8), [10]))
    with pytest.raises(DatasetError, match=r"labels must be in 0..9, found 10..10"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_cannot_run_code(tmp_path):
    write_cifar10_pickles(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DatasetError, match=r"refusing to load global builtins.print"):
        cf.data.load("cifar10", data_dir=tmp_path, download=False)


def test_truncated_tar(tmp_path):
    write_cifar10_pickles(tmp_path / "src")
    (tmp_path / "d").mkdir()
    archive = _tar_batches(tmp_path)
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(DatasetError, match=r"corrupt or truncated archive .*cifar-10-python.tar.gz"):
        cf.data.load("cifar10", data_dir=tmp_path / "d", download=False)
