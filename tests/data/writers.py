"""Write tiny datasets in the official formats, for the loaders to read."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")  # fmt: skip


def rng(seed=0):
    return np.random.default_rng(seed)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000_08_<ndim>, big-endian sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def write_mnist(folder: Path, gz=True, per_class=(3, 2), seed=0, marker=None):
    """Four IDX files; returns (train_x, train_y, test_x, test_y) with x (N, 28, 28)."""
    r = rng(seed)
    arrays = []
    for n in per_class:
        y = np.repeat(np.arange(10), n).astype(np.uint8)
        r.shuffle(y)
        x = r.integers(0, 256, (len(y), 28, 28), dtype=np.uint8)
        if marker is not None:
            x[0, 0, 0] = marker
        arrays += [x, y]
    for stem, array in zip(MNIST_FILES, arrays):
        write_bytes(folder / (stem + (".gz" if gz else "")), idx_bytes(array))
    return arrays


def cifar_pickle(images: np.ndarray, labels, label_key="labels") -> bytes:
    """A batch as the official files hold it: dict of bytes keys, data (N, 3072) uint8."""
    entry = {b"batch_label": b"tiny", b"data": images.reshape(len(images), -1),
             label_key.encode(): list(map(int, labels))}  # fmt: skip
    return pickle.dumps(entry, protocol=2)


def write_cifar10_pickles(folder: Path, per_batch=4, seed=0):
    """cifar-10-batches-py/ with 5 training batches and a test batch; returns the arrays."""
    r = rng(seed)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = r.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = r.integers(0, 10, per_batch)
        write_bytes(folder / "cifar-10-batches-py" / name, cifar_pickle(x, y))
        out[name] = (x, y)
    train_x = np.concatenate([out[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = np.concatenate([out[f"data_batch_{i}"][1] for i in range(1, 6)])
    return train_x, train_y, out["test_batch"][0], out["test_batch"][1]


def tar_folder(source: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of an (H, W, 3) or (H, W) uint8 array: lossless, so pixels round-trip exactly."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_class_folders(root: Path, classes, per_class=2, size=32, seed=0, names=None, fmt="png"):
    """<root>/<class>/<name> images; returns images (N, 3, H, W) and labels in loader order."""
    r = rng(seed)
    names = names or [f"{i}.{fmt}" for i in range(per_class)]
    images, labels = [], []
    for label, c in enumerate(classes):
        for name in names:
            pixels = r.integers(0, 256, (size, size, 3), dtype=np.uint8)
            path = root / c / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "png":
                path.write_bytes(png_bytes(pixels))
            else:
                Image.fromarray(pixels).save(path, quality=95)
            images.append(pixels.transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), np.array(labels)


def write_tiny_imagenet(root: Path, wnids=("n02", "n01", "n03"), train_per_class=2, val_per_class=2, seed=0):
    """A tiny-imagenet-200/ folder with PNG bytes in .JPEG files; returns expected arrays."""
    r = rng(seed)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    order = sorted(wnids)
    train_x, train_y = [], []
    for w in order:
        for i in range(train_per_class):
            pixels = r.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            write_bytes(base / "train" / w / "images" / f"{w}_{i}.JPEG", png_bytes(pixels))
            train_x.append(pixels.transpose(2, 0, 1))
            train_y.append(order.index(w))
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    lines, test = [], []
    for k in range(val_per_class * len(wnids)):
        w = wnids[k % len(wnids)]
        pixels = r.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        write_bytes(base / "val" / "images" / f"val_{k}.JPEG", png_bytes(pixels))
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
        test.append((pixels.transpose(2, 0, 1), order.index(w)))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_bytes(base / "test" / "images" / "test_0.JPEG", png_bytes(np.zeros((64, 64, 3), np.uint8)))
    return (np.stack(train_x), np.array(train_y), np.stack([t[0] for t in test]), np.array([t[1] for t in test]))


def zip_folder(source: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(source.parent).as_posix())
    return archive
