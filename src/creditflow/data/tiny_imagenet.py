"""Tiny-ImageNet (200 classes, 64x64 RGB) from the official ``tiny-imagenet-200`` layout.

Read from the extracted folder or straight from ``tiny-imagenet-200.zip``:
``wnids.txt``, ``train/<wnid>/images/*.JPEG`` (500 per class) and ``val/images/*.JPEG`` with
labels in ``val/val_annotations.txt`` (tab-separated: file, wnid, bounding box).

The official test images carry no labels, so the official **validation** set (50 per class) is
used as the test split; ``load`` holds a validation set out of the training images as for
every dataset. Labels are the wnids in sorted order (as torchvision's ``ImageFolder`` gives).
Grayscale JPEGs are converted to RGB. Decoded pixels are cached (see ``cache.py``).

References:
    Le and Yang 2015, "Tiny ImageNet visual recognition challenge" (CS231n, Stanford).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..registry import register_dataset
from .archive import Tree, open_tree
from .cache import cached
from .errors import DatasetError
from .folders import decode_images, is_image, natural_key
from .imageset import ImageSet
from .sources import Resource, Where, locatable, locate
from .splits import Official

_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET = Where(
    "tiny-imagenet",
    expects="tiny-imagenet-200/ (wnids.txt, train/, val/) or tiny-imagenet-200.zip",
    how_to=f"download {_URL} into a folder and pass it as data_dir (no need to unzip)",
    resources=(Resource("tiny-imagenet-200.zip", (_URL,), md5="90528d7ca1a48142e341f4ef8d21d0de"),),
)


def probe(folder: Path) -> Path | None:
    """The extracted ``tiny-imagenet-200`` folder or its zip under ``folder``, or None."""
    for candidate in (folder / "tiny-imagenet-200", folder):
        if (candidate / "wnids.txt").is_file() and (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    zipped = folder / "tiny-imagenet-200.zip"
    return zipped if zipped.is_file() else None


def _text(tree: Tree, name: str) -> str:
    try:
        return tree.read(name).decode("utf-8")
    except (KeyError, FileNotFoundError):
        raise DatasetError(f"{tree.origin} has no {name}") from None


def list_files(tree: Tree, prefix: str) -> tuple[tuple[str, ...], dict]:
    """Class wnids (sorted) and, per split, the image names and labels to decode."""
    wnids = tuple(sorted(_text(tree, prefix + "wnids.txt").split()))
    if not wnids:
        raise DatasetError(f"{tree.origin}/{prefix}wnids.txt lists no classes")
    label_of = {w: i for i, w in enumerate(wnids)}
    names = tree.names()
    train = []
    for name in names:
        parts = name[len(prefix) :].split("/") if name.startswith(prefix) else []
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and is_image(name):
            if parts[1] not in label_of:
                raise DatasetError(f"training folder {parts[1]!r} in {tree.origin} is not listed in wnids.txt")
            train.append((label_of[parts[1]], natural_key(parts[3]), name))
    train.sort()
    missing = sorted(set(wnids) - {wnids[label] for label, _, _ in train})
    if missing:
        raise DatasetError(f"no training images for {', '.join(missing[:5])} in {tree.origin}")

    present, test = set(names), []
    annotations = prefix + "val/val_annotations.txt"
    for line_no, line in enumerate(_text(tree, annotations).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DatasetError(f"bad line {line_no} in {tree.origin}/{annotations}: {line.strip()!r}")
        name = f"{prefix}val/images/{fields[0]}"
        if name not in present:
            raise DatasetError(f"{tree.origin}/{annotations} line {line_no} names missing file {fields[0]}")
        test.append((natural_key(fields[0]), name, label_of[fields[1]]))
    test.sort()
    return wnids, {
        "train": ([n for _, _, n in train], np.array([lab for lab, _, _ in train], dtype=np.int64)),
        "test": ([n for _, n, _ in test], np.array([lab for _, _, lab in test], dtype=np.int64)),
    }


@register_dataset("tiny-imagenet", summary="200-class 64x64 RGB ImageNet subset, 100k/10k (official val as test)",
                  paper="Le and Yang 2015")  # fmt: skip
def tiny_imagenet(data_dir=None, download=True) -> Official:
    source, _ = locate(TINY_IMAGENET, probe, data_dir, download)
    tree = open_tree(source)
    prefix = "tiny-imagenet-200/" if source.name.endswith(".zip") else ""
    wnids, splits = list_files(tree, prefix)
    labels = np.concatenate([splits["train"][1], splits["test"][1]])
    # labels come from wnids.txt and val_annotations.txt, not only from the image files
    key = [tree.fingerprint(splits["train"][0] + splits["test"][0]), list(wnids),
           hashlib.sha256(labels.tobytes()).hexdigest()]  # fmt: skip

    def build():
        out = {}
        for split, (names, labels) in splits.items():
            out[f"{split}_images"], out[f"{split}_labels"] = decode_images(tree, names, (64, 64)), labels
        return out

    arrays = cached("tiny-imagenet", key, build)
    return Official(
        train=ImageSet.from_numpy(arrays["train_images"], arrays["train_labels"]),
        test=ImageSet.from_numpy(arrays["test_images"], arrays["test_labels"]),
        num_classes=len(wnids),
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
        classes=wnids,
        origin=str(source),
    )


locatable(TINY_IMAGENET, probe)
