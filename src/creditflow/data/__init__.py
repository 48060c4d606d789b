"""Datasets as in-memory uint8 tensors, a stratified validation split, and batch augmentation.

    splits = creditflow.data.load("fashion-mnist-mini")            # embedded, offline
    for x, y in creditflow.data.batches(splits.train, 128, shuffle=True, generator=g):
        logits = model(splits.normalize(augment(x.to(dev), generator=g)))

Import is registration: each format module registers its datasets (see ``available()``).
Where files are looked for: ``sources.py``; formats: one module each; see docs/data.md.
"""

from __future__ import annotations

import dataclasses
import os

from ..registry import DATASETS
from . import augment, cifar, embedded, mnist, svhn, tiny_imagenet  # noqa: F401  (registration)
from .errors import ChecksumError, DatasetError, DatasetNotFound
from .imageset import ImageSet, batches
from .sources import describe_reads, recording
from .splits import Official, Splits, check_fraction, split_official

__all__ = [
    "ChecksumError", "DatasetError", "DatasetNotFound", "ImageSet", "Official", "Splits",
    "augment", "available", "batches", "load",
]  # fmt: skip


def available() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.available()


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Load a dataset and hold out a stratified validation set from its training set.

    Args:
        name: a registered dataset (``available()``); unknown names list the known ones.
        data_dir: the folder the data must come from (strict); None: search (``sources.py``).
        download: fetch missing files into the user cache when they are found nowhere.
        val_fraction: fraction of each class of the official training set held out for
            validation, in [0, 1); 0 gives an empty validation set.
        seed: seed of the hold-out; the same seed always gives the same split.

    Returns:
        ``Splits`` with uint8 images, int64 labels, class count and normalisation statistics.

    Raises:
        ValueError: unknown name or ``val_fraction`` outside [0, 1).
        DatasetNotFound: the files are nowhere and could not be downloaded, or not in ``data_dir``
            (when given, the only place looked in).
        DatasetError: a file is truncated, corrupt or in the wrong format.
    """
    check_fraction(val_fraction)  # fail before reading any file
    with recording() as reads:
        official = DATASETS.get(name).builder(data_dir=data_dir, download=download)
    return dataclasses.replace(split_official(name, official, val_fraction, seed), files=describe_reads(reads))
