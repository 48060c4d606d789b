"""MNIST-style IDX files: both loaders, plain and gzip, and every documented error."""

import numpy as np
import pytest
import torch

import creditflow as cf
from creditflow.data import DatasetError
from creditflow.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, read_pair

from .writers import idx_bytes, write_bytes, write_mnist


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [True, False])
def test_loads_official_files(tmp_path, name, gz):
    train_x, train_y, test_x, test_y = write_mnist(tmp_path, gz=gz)
    splits = cf.data.load(name, data_dir=tmp_path, download=False, val_fraction=0)
    assert splits.shape == (1, 28, 28) and splits.num_classes == 10 and splits.name == name
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(train_x))
    assert torch.equal(splits.train.labels, torch.from_numpy(train_y).long())
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(test_x))
    assert torch.equal(splits.test.labels, torch.from_numpy(test_y).long())
    assert len(splits.val) == 0


def test_plain_and_gzip_read_the_same(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    plain = write_bytes(tmp_path / "a", idx_bytes(array))
    packed = write_bytes(tmp_path / "a.gz", idx_bytes(array))
    assert np.array_equal(read_idx(plain, IMAGES_MAGIC, (28, 28)), read_idx(packed, IMAGES_MAGIC, (28, 28)))


def test_truncated_file_names_header_and_size(tmp_path):
    data = idx_bytes(np.zeros((60, 28, 28), np.uint8))[: 16 + 1000]
    path = write_bytes(tmp_path / "train-images-idx3-ubyte.gz", data)
    with pytest.raises(DatasetError, match=r"truncated IDX file .*train-images-idx3-ubyte.gz: "
                       r"header says 60x28x28 = 47040 bytes, found 1000"):  # fmt: skip
        read_idx(path, IMAGES_MAGIC, (28, 28))


def test_oversized_file(tmp_path):
    path = write_bytes(tmp_path / "labels", idx_bytes(np.zeros(5, np.uint8)) + b"\0\0")
    with pytest.raises(DatasetError, match=r"oversized IDX file .*: header says 5 = 5 bytes, found 7"):
        read_idx(path, LABELS_MAGIC)


def test_wrong_magic(tmp_path):
    path = write_bytes(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DatasetError, match=r"bad magic number .*expected 2051 \(images\), found 2049 \(labels\)"):
        read_idx(path, IMAGES_MAGIC, (28, 28))


def test_wrong_shape(tmp_path):
    path = write_bytes(tmp_path / "imgs", idx_bytes(np.zeros((3, 27, 28), np.uint8)))
    with pytest.raises(DatasetError, match=r"wrong shape in IDX file .*imgs: 3x27x28, expected Nx28x28"):
        read_idx(path, IMAGES_MAGIC, (28, 28))


def test_short_header(tmp_path):
    path = write_bytes(tmp_path / "x", b"\0\0")
    with pytest.raises(DatasetError, match="too short for a header"):
        read_idx(path, IMAGES_MAGIC)


def test_corrupt_gzip(tmp_path):
    path = write_bytes(tmp_path / "x.gz", idx_bytes(np.ones((4, 28, 28), np.uint8)))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError, match=r"corrupt or truncated gzip file .*x.gz"):
        read_idx(path, IMAGES_MAGIC)


def test_label_count_mismatch(tmp_path):
    images = write_bytes(tmp_path / "i", idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    labels = write_bytes(tmp_path / "l", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DatasetError, match=r"label count 4 in .*l does not match image count 3 in .*i"):
        read_pair(images, labels, 10)


def test_label_out_of_range(tmp_path):
    images = write_bytes(tmp_path / "i", idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    labels = write_bytes(tmp_path / "l", idx_bytes(np.array([1, 12], np.uint8)))
    with pytest.raises(DatasetError, match=r"labels in .*l must be in 0..9, found 12"):
        read_pair(images, labels, 10)


def test_loader_reports_bad_file(tmp_path):
    write_mnist(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_bytes(bad, idx_bytes(np.zeros(7, np.uint8)))  # 7 labels for 20 test images
    with pytest.raises(DatasetError, match="does not match image count"):
        cf.data.load("mnist", data_dir=tmp_path, download=False)
