"""Train / validation / test splits and the stratified hold-out.

Validation protocol: the validation set is held out of the official training set, per class
(stratified), with a seeded permutation, so model selection never sees the official test set
and the same seed always gives the same split on any machine (``torch.randperm`` on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .imageset import ImageSet


@dataclass(frozen=True)
class Official:
    """What a dataset loader returns: the official train and test sets and their metadata.

    Attributes:
        train, test: the official splits.
        num_classes: number of classes; labels are 0..num_classes-1.
        mean, std: per-channel statistics in [0, 1] pixel units used by ``Splits.normalize``.
        classes: class names in label order.
        origin: where the files were read from (shown in logs and results).
    """

    train: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    origin: str = ""


@dataclass(frozen=True)
class Splits:
    """A dataset ready for training: train, validation and test sets plus normalisation.

    Attributes:
        train: the official training set minus the validation samples.
        val: a stratified, seeded hold-out of the official training set (may be empty).
        test: the official test set (Tiny-ImageNet: the official validation set).
        num_classes: number of classes.
        name: registry name of the dataset.
        mean, std: per-channel statistics in [0, 1] pixel units.
        classes: class names in label order.
        origin: where the files were read from.
        files: the files read, ``{"path", "bytes", "sha256"}`` each (a folder of many: one entry
            with ``files``, their count): what a run records of its data.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    origin: str = ""
    files: tuple[dict, ...] = ()
    _stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.images.shape[1:])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map pixels to ``(x / 255 - mean) / std`` as float32.

        Args:
            x: (N, C, H, W) or (C, H, W) in pixel units 0..255, uint8 or float, any device.

        Returns:
            float32 tensor of the same shape on the same device.
        """
        key = x.device  # keep one copy of mean/std per device: no host-to-device copy per batch
        if key not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
            # (x/255 - m)/s == x * (1/(255 s)) - m/s: one multiply-add per pixel
            self._stats[key] = ((1.0 / (255.0 * std)).to(x.device), (mean / std).to(x.device))
        scale, shift = self._stats[key]
        return x.to(torch.float32) * scale - shift


def check_fraction(val_fraction: float) -> float:
    """Return ``val_fraction`` as a float, or raise ``ValueError`` naming the allowed range."""
    try:
        f = float(val_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
    if not 0.0 <= f < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return f


def stratified_holdout(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``round(val_fraction * n_c)`` samples of every class c for validation.

    One seeded permutation of all samples, stably sorted by label, ranks the samples of each
    class in random order; the first ``n_val[c]`` of each class go to validation. No loop over
    classes or samples.

    Args:
        labels: int64 (N,) class ids.
        val_fraction: fraction in [0, 1).
        seed: seed of the CPU generator that draws the permutation.

    Returns:
        train_index, val_index: sorted int64 indices into ``labels``, disjoint, covering 0..N-1.
    """
    f = check_fraction(val_fraction)
    labels = labels.cpu()
    n = len(labels)
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    counts = torch.bincount(labels)  # (K,)
    n_val = torch.floor(counts.double() * f + 0.5).long()  # round half up, per class
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    by_class = perm[torch.sort(labels[perm], stable=True).indices]  # grouped by label, random within
    starts = torch.cumsum(counts, 0) - counts  # first position of each class in by_class
    rank = torch.arange(n) - starts[labels[by_class]]  # rank of each sample within its class
    is_val = rank < n_val[labels[by_class]]
    val_index = torch.sort(by_class[is_val]).values
    train_index = torch.sort(by_class[~is_val]).values
    return train_index, val_index


def split_official(name: str, official: Official, val_fraction: float, seed: int) -> Splits:
    """Hold out a stratified validation set from ``official.train`` and build ``Splits``."""
    train_index, val_index = stratified_holdout(official.train.labels, val_fraction, seed)
    # no hold-out: share the official tensors instead of copying them
    train = official.train if len(val_index) == 0 else official.train.subset(train_index)
    return Splits(
        train=train,
        val=official.train.subset(val_index),
        test=official.test,
        num_classes=official.num_classes,
        name=name,
        mean=tuple(official.mean),
        std=tuple(official.std),
        classes=tuple(official.classes),
        origin=official.origin,
    )
