"""Reader for the IDX format of MNIST and Fashion-MNIST, plain or gzip-compressed.

Header (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions d, then d uint32 sizes; the data follows. The magic number is the first four bytes
as one integer: 2051 for images (d = 3), 2049 for labels (d = 1).

References:
    LeCun, Cortes and Burges, "The MNIST database of handwritten digits", file formats section.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .sources import note

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_KIND = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip signature."""
    path = Path(path)
    note(path)
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"corrupt or truncated gzip file {path}: {err}") from None


def read_idx(path: str | os.PathLike, magic: int, shape: tuple[int, ...] = ()) -> np.ndarray:
    """Read one IDX file of unsigned bytes and check it against what the caller expects.

    Args:
        path: the file, plain or .gz.
        magic: the required magic number (``IMAGES_MAGIC`` or ``LABELS_MAGIC``).
        shape: required sizes of the dimensions after the first, e.g. (28, 28).

    Returns:
        uint8 array with the header's shape, e.g. (60000, 28, 28).

    Raises:
        DatasetError: wrong magic number, wrong dimensions, or a length that disagrees with
            the header.
    """
    data = read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"truncated IDX file {path}: {len(data)} bytes, too short for a header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        what = f" ({_KIND[found]})" if found in _KIND else ""
        raise DatasetError(
            f"bad magic number in IDX file {path}: expected {magic} ({_KIND[magic]}), found {found}{what}"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"truncated IDX file {path}: header of {ndim} dimensions cut short")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if shape and dims[1:] != tuple(shape):
        want = "x".join(map(str, ("N",) + tuple(shape)))
        raise DatasetError(f"wrong shape in IDX file {path}: {'x'.join(map(str, dims))}, expected {want}")
    size = int(np.prod(dims))
    if len(data) - header != size:
        problem = "truncated" if len(data) - header < size else "oversized"
        raise DatasetError(
            f"{problem} IDX file {path}: header says {'x'.join(map(str, dims))} = {size} bytes, "
            f"found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_pair(
    images_path: str | os.PathLike, labels_path: str | os.PathLike, num_classes: int, size=(28, 28)
) -> tuple[np.ndarray, np.ndarray]:
    """Read matching image and label files and check they agree.

    Returns:
        images: uint8 (N, 1, H, W); labels: int64 (N,).
    """
    images = read_idx(images_path, IMAGES_MAGIC, size)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(labels) != len(images):
        raise DatasetError(
            f"label count {len(labels)} in {labels_path} does not match image count "
            f"{len(images)} in {images_path}"
        )
    if len(labels) and labels.max() >= num_classes:
        raise DatasetError(
            f"labels in {labels_path} must be in 0..{num_classes - 1}, found {int(labels.max())}"
        )
    return images[:, None], labels.astype(np.int64)
