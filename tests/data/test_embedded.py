"""The embedded default dataset loads offline with the stated counts; the builder is reproducible."""

import hashlib
import importlib.util
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

import creditflow as cf

from .writers import MNIST_FILES, idx_bytes, write_bytes

EMBEDDED = resources.files("creditflow.data") / "embedded"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_embedded_dataset.py"


def test_loads_offline_with_stated_counts(tmp_path):
    splits = cf.data.load("fashion-mnist-mini", data_dir=tmp_path / "ignored", download=True, val_fraction=0)
    assert splits.num_classes == 10 and splits.shape == (1, 28, 28) and splits.classes[0] == "T-shirt/top"
    assert torch.bincount(splits.train.labels).tolist() == [800] * 10
    assert torch.bincount(splits.test.labels).tolist() == [200] * 10
    x = splits.normalize(splits.train.images)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_file_size_and_licence():
    assert len((EMBEDDED / "fashion_mnist_mini.npz").read_bytes()) <= 6 * 1024 * 1024
    licence = (EMBEDDED / "LICENSE-fashion-mnist.md").read_text()
    assert "Copyright (c) 2017 Zalando SE" in licence and "Permission is hereby granted" in licence
    digest = hashlib.sha256((EMBEDDED / "fashion_mnist_mini.npz").read_bytes()).hexdigest()
    assert digest in licence  # the notice describes this exact file


def test_registry_lists_every_dataset():
    assert cf.data.available() == ["cifar10", "cifar100", "fashion-mnist", "fashion-mnist-mini", "mnist", "svhn",
                                   "tiny-imagenet"]  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown dataset 'mnsit'; available: .* \(closest: mnist\)"):
        cf.data.load("mnsit")


def test_build_script_is_deterministic(tmp_path):
    r = np.random.default_rng(0)
    for stem, n in zip(MNIST_FILES, (60, 60, 30, 30)):
        if "labels" in stem:
            array = np.repeat(np.arange(10, dtype=np.uint8), n // 10)
        else:
            array = r.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_bytes(tmp_path / "src" / f"{stem}.gz", idx_bytes(array))
    spec = importlib.util.spec_from_file_location("build_embedded_dataset", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name / "mini.npz"
        script.main(["--source", str(tmp_path / "src"), "--out", str(out),
                     "--train-per-class", "4", "--test-per-class", "2"])  # fmt: skip
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    with np.load(tmp_path / "a" / "mini.npz") as arrays:
        assert arrays["train_images"].shape == (40, 28, 28) and np.bincount(arrays["test_labels"]).tolist() == [2] * 10
