"""Image-folder datasets: ``<split>/<class>/<file>`` decoded with Pillow into uint8 arrays.

Files are ordered by class, then by file name with numbers compared as numbers
('2.png' < '10.png'), so the order does not depend on the file system or the archive.
"""

from __future__ import annotations

import io
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .archive import Tree
from .errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp")


def natural_key(name: str) -> list:
    """Sort key comparing digit runs as numbers: 'img2' < 'img10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def class_files(
    tree: Tree, prefix: str, classes: tuple[str, ...]
) -> tuple[list[str], np.ndarray]:
    """List ``<prefix><class>/<file>`` images in label order.

    Args:
        tree: the folder or archive.
        prefix: the split's folder inside ``tree`` ('train/'), or '' when the tree is the split.
        classes: class folder names in label order.

    Returns:
        names: relative paths, by class then natural file order.
        labels: int64 (N,) class ids.

    Raises:
        DatasetError: a folder names an unknown class, or a class has no images.
    """
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for name in tree.names():
        if not name.startswith(prefix) or not is_image(name):
            continue
        parts = name[len(prefix) :].split("/")
        if len(parts) != 2:
            continue  # deeper files are not part of this layout
        if parts[0] not in by_class:
            raise DatasetError(
                f"unknown class folder {parts[0]!r} in {tree.origin}/{prefix}; "
                f"expected: {', '.join(classes)}"
            )
        by_class[parts[0]].append(name)
    empty = [c for c, files in by_class.items() if not files]
    if empty:
        raise DatasetError(f"no images for class(es) {', '.join(empty)} in {tree.origin}/{prefix}")
    names, labels = [], []
    for label, c in enumerate(classes):
        files = sorted(by_class[c], key=natural_key)
        names += files
        labels += [label] * len(files)
    return names, np.asarray(labels, dtype=np.int64)


def decode_images(tree: Tree, names: list[str], size: tuple[int, int]) -> np.ndarray:
    """Decode images to RGB uint8 (N, 3, H, W), checking every image is ``size`` (H, W).

    Pillow releases the GIL while decoding, so a thread pool scales with the cores.
    """
    from PIL import Image

    height, width = size
    out = np.empty((len(names), height, width, 3), dtype=np.uint8)  # (N, H, W, C) as decoded

    def decode(i: int) -> None:
        name = names[i]
        try:
            with Image.open(io.BytesIO(tree.read(name))) as image:
                rgb = image.convert("RGB")  # grayscale JPEGs exist in Tiny-ImageNet
        except DatasetError:
            raise
        except Exception as err:  # Pillow raises many types for bad files
            raise DatasetError(f"cannot decode image {tree.origin}/{name}: {err}") from None
        if rgb.size != (width, height):
            raise DatasetError(
                f"image {tree.origin}/{name} is {rgb.size[1]}x{rgb.size[0]}, expected {height}x{width}"
            )
        out[i] = np.asarray(rgb)

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(decode, range(len(names))):
            pass
    finally:  # on a bad image, report it now instead of decoding the rest first
        pool.shutdown(cancel_futures=True)
    return out.transpose(0, 3, 1, 2).copy()  # (N, C, H, W), contiguous
