"""``fashion-mnist-mini``: a stratified Fashion-MNIST subset shipped inside the package.

It is the default dataset because it needs no files and no network: tests, examples and a
first ``creditflow train`` run work offline. 800 images per class from the official training
set and 200 per class from the official test set (8,000 / 2,000), chosen with a seeded RNG by
``scripts/build_embedded_dataset.py``; licence and provenance in
``embedded/LICENSE-fashion-mnist.md``.

References:
    Xiao, Rasul and Vollgraf 2017, "Fashion-MNIST: a novel image dataset for benchmarking
    machine learning algorithms".
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from ..registry import register_dataset
from .imageset import ImageSet
from .mnist import FASHION_CLASSES
from .sources import note
from .splits import Official

FILENAME = "fashion_mnist_mini.npz"


def read_embedded() -> dict[str, np.ndarray]:
    """The four arrays of the embedded file (images (N, 28, 28) uint8, labels (N,) uint8)."""
    with resources.as_file(resources.files(__package__) / "embedded" / FILENAME) as path:
        note(path)
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}


@register_dataset("fashion-mnist-mini", summary="embedded Fashion-MNIST subset, 8k/2k 28x28, no download",
                  paper="Xiao et al. 2017")  # fmt: skip
def fashion_mnist_mini(data_dir=None, download=True) -> Official:
    """Load the embedded subset; ``data_dir`` and ``download`` are ignored."""
    arrays = read_embedded()
    return Official(
        train=ImageSet.from_numpy(arrays["train_images"][:, None], arrays["train_labels"]),
        test=ImageSet.from_numpy(arrays["test_images"][:, None], arrays["test_labels"]),
        num_classes=10,
        mean=(0.2860,),  # the full set's published values; the subset's agree to 3 decimals
        std=(0.3530,),
        classes=FASHION_CLASSES,
        origin=f"embedded {FILENAME}",
    )
