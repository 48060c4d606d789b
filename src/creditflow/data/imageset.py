"""In-memory image sets and batch iteration.

Every supported dataset fits in memory as uint8 (CIFAR-10: 184 MB), so a set is two tensors
and a batch is an index into them: no workers, no per-sample Python, and the whole set can
live on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSet:
    """Images and labels held as tensors.

    Attributes:
        images: uint8 tensor (N, C, H, W), pixel values 0..255.
        labels: int64 tensor (N,), class ids 0..num_classes-1.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"labels must be an int64 tensor (N,), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    @classmethod
    def from_numpy(cls, images, labels) -> "ImageSet":
        """Build from numpy arrays (copied when read-only, e.g. ``np.frombuffer`` results)."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if not images.flags.writeable:
            images = images.copy()
        if not labels.flags.writeable:
            labels = labels.copy()
        return cls(torch.from_numpy(images), torch.from_numpy(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "ImageSet":
        """Return a copy on ``device`` (this set is left where it is)."""
        return ImageSet(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """Return the samples at ``index`` (a copy, in the order given)."""
        index = index.to(self.labels.device)
        return ImageSet(self.images[index], self.labels[index])


def batches(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    skip: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches by indexing the in-memory tensors.

    Args:
        data: the set to iterate over; batches live on its device.
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: visit samples in the order of ``torch.randperm(N, generator=generator)``;
            otherwise in stored order, as views without a copy.
        generator: source of the permutation; its device is where the permutation is drawn.
        drop_last: skip a final batch smaller than ``batch_size``.
        skip: leave out the first ``skip`` batches (an epoch resumed where it was cut): the
            permutation is drawn as for the whole epoch, so the next batch is the one the
            uninterrupted epoch would give.

    Yields:
        x: uint8 (B, C, H, W); y: int64 (B,).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data)
    stop = n - n % batch_size if drop_last else n
    first = skip * batch_size
    if shuffle:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device).to(data.labels.device)
        for start in range(first, stop, batch_size):
            index = order[start : start + batch_size]
            yield data.images[index], data.labels[index]
    else:
        for start in range(first, stop, batch_size):
            yield data.images[start : start + batch_size], data.labels[start : start + batch_size]
