"""SVHN (cropped digits) from the official ``train_32x32.mat`` and ``test_32x32.mat``.

Each file holds ``X``: (32, 32, 3, N) uint8 and ``y``: (N, 1) with digits 1..10, where 10
stands for the digit 0; labels here are the digits themselves (10 -> 0). The ``extra`` set is
not used. Reading .mat files needs scipy, imported only when SVHN is loaded.

References:
    Netzer, Wang, Coates, Bissacco, Wu and Ng 2011, "Reading digits in natural images with
    unsupervised feature learning", section 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..registry import register_dataset
from .errors import DatasetError
from .imageset import ImageSet
from .sources import Resource, Where, locatable, locate, note
from .splits import Official

_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN = Where(
    "svhn",
    expects="train_32x32.mat and test_32x32.mat",
    how_to=f"download {_URL}train_32x32.mat and {_URL}test_32x32.mat into a folder and pass it as data_dir",
    resources=(
        Resource("train_32x32.mat", (_URL + "train_32x32.mat",), md5="e26dedcc434d2e4c54c9b2d4a06d8373"),
        Resource("test_32x32.mat", (_URL + "test_32x32.mat",), md5="eb5a983be6a315427106f1b164d9cef3"),
    ),
)


def probe(folder: Path) -> tuple[Path, Path] | None:
    train, test = folder / "train_32x32.mat", folder / "test_32x32.mat"
    return (train, test) if train.is_file() and test.is_file() else None


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN .mat file into images (N, 3, 32, 32) uint8 and labels (N,) int64 (0..9)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError("reading SVHN .mat files needs scipy: pip install creditflow[svhn]") from None
    note(path)
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except Exception as err:  # scipy raises ValueError, TypeError, OSError... for bad files
        raise DatasetError(f"cannot read SVHN file {path}: {type(err).__name__}: {err}") from None
    for key in ("X", "y"):
        if key not in mat:
            raise DatasetError(f"SVHN file {path} has no {key!r} variable")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetError(f"SVHN file {path}: X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    if len(y) != x.shape[3]:
        raise DatasetError(f"SVHN file {path}: {len(y)} labels for {x.shape[3]} images")
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise DatasetError(f"SVHN file {path}: labels must be in 1..10 (10 = digit 0), found {y.min()}..{y.max()}")
    labels = y.astype(np.int64) % 10  # 10 means the digit 0
    return x.transpose(3, 2, 0, 1), labels  # (H, W, C, N) -> (N, C, H, W)


@register_dataset("svhn", summary="street-view house-number digits, 73k/26k 32x32 RGB",
                  paper="Netzer et al. 2011")  # fmt: skip
def svhn(data_dir=None, download=True) -> Official:
    (train, test), folder = locate(SVHN, probe, data_dir, download)
    return Official(
        train=ImageSet.from_numpy(*read_mat(train)),
        test=ImageSet.from_numpy(*read_mat(test)),
        num_classes=10,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        classes=tuple(str(d) for d in range(10)),
        origin=str(folder),
    )


locatable(SVHN, probe)
