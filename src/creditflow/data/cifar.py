"""CIFAR-10 and CIFAR-100 from the official python pickles, or CIFAR-10 from image folders.

CIFAR-10 is read from any of:

- ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``; dicts with
  ``data``: (N, 3072) uint8 in channel-major order and ``labels``), or those files directly;
- ``cifar-10-python.tar.gz`` (the official download, read without extracting);
- image folders ``train/<class>/*`` and ``test/<class>/*`` (JPEG or PNG), extracted or as
  ``train.tar.gz`` / ``test.tar.gz``; classes in the official order. Decoded pixels are
  cached (see ``cache.py``).

CIFAR-100 is read from ``cifar-100-python/`` (``train``, ``test`` with ``fine_labels``) or
``cifar-100-python.tar.gz``; the 100 fine classes are used.

The pickles are read with an unpickler that only builds dicts, lists, strings and numpy
arrays, so a tampered file cannot run code.

References:
    Krizhevsky 2009, "Learning multiple layers of features from tiny images", chapter 3.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ..registry import register_dataset
from .archive import DirTree, file_fingerprint, open_tree
from .cache import cached
from .errors import DatasetError
from .folders import class_files, decode_images
from .imageset import ImageSet
from .sources import Resource, Where, locatable, locate
from .splits import Official

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")  # fmt: skip
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree
orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum
rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train
trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())

CIFAR10 = Where(
    "cifar10",
    expects="cifar-10-batches-py/ or cifar-10-python.tar.gz, or image folders train/<class>/ and "
    "test/<class>/ (or train.tar.gz and test.tar.gz)",
    how_to="download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into a folder and "
    "pass it as data_dir",
    resources=(Resource("cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                        md5="c58f30108f718f92721af3b95e74349a"),),  # fmt: skip
)
CIFAR100 = Where(
    "cifar100",
    expects="cifar-100-python/ (train, test) or cifar-100-python.tar.gz",
    how_to="download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into a folder and "
    "pass it as data_dir",
    resources=(Resource("cifar-100-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                        md5="eb9058c3a382ffc7106e4002c42a8d85"),),  # fmt: skip
)

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}  # fmt: skip


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except what numpy arrays need."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_batch(raw: bytes, origin: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one CIFAR pickle into images (N, 3, 32, 32) uint8 and labels (N,) int64.

    Raises:
        DatasetError: not a pickle, a missing key, or data of the wrong shape or range.
    """
    try:
        # latin1 decodes Python 2 byte strings inside numpy arrays; keys may come back as bytes
        entry = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as err:
        raise DatasetError(f"cannot read CIFAR batch {origin}: {type(err).__name__}: {err}") from None
    if not isinstance(entry, dict):
        raise DatasetError(f"CIFAR batch {origin} holds a {type(entry).__name__}, expected a dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    for key in ("data", label_key):
        if key not in entry:
            raise DatasetError(f"CIFAR batch {origin} has no {key!r} entry")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"CIFAR batch {origin}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
        )
    if len(labels) != len(data):
        raise DatasetError(f"CIFAR batch {origin}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"CIFAR batch {origin}: labels must be in 0..{num_classes - 1}, "
            f"found {labels.min()}..{labels.max()}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_batches(tree, names: tuple[str, ...], label_key: str, num_classes: int) -> ImageSet:
    """Concatenate the named pickles of one split (names may sit under a folder in an archive)."""
    if isinstance(tree, DirTree):  # the files sit in the folder itself; no need to walk it
        index = {n: n for n in names if (tree.origin / n).is_file()}
    else:  # archives hold them under a folder such as cifar-10-batches-py/
        index = {n.rsplit("/", 1)[-1]: n for n in tree.names()}
    parts = []
    for name in names:
        if name not in index:
            raise DatasetError(f"{tree.origin} has no {name}")
        path = index[name]
        parts.append(read_batch(tree.read(path), f"{tree.origin}/{path}", label_key, num_classes))
    return ImageSet.from_numpy(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _has(folder: Path, names) -> bool:
    return all((folder / n).is_file() for n in names)


def _first_archive(folder: Path, stem: str) -> Path | None:
    paths = (folder / f"{stem}{suffix}" for suffix in (".tar.gz", ".tgz", ".tar"))
    return next((p for p in paths if p.is_file()), None)


def probe_cifar10(folder: Path):
    """Which CIFAR-10 layout ``folder`` holds, as (kind, path or paths), or None."""
    batches = CIFAR10_TRAIN + CIFAR10_TEST
    for candidate in (folder / "cifar-10-batches-py", folder):
        if _has(candidate, batches):
            return "pickles", candidate
    if (folder / "cifar-10-python.tar.gz").is_file():
        return "pickles", folder / "cifar-10-python.tar.gz"
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return "folders", (folder / "train", folder / "test")
    train, test = _first_archive(folder, "train"), _first_archive(folder, "test")
    if train and test:
        return "folders", (train, test)
    return None


def probe_cifar100(folder: Path):
    """The CIFAR-100 pickles folder or archive in ``folder``, or None."""
    for candidate in (folder / "cifar-100-python", folder):
        if _has(candidate, ("train", "test")):
            return candidate
    if (folder / "cifar-100-python.tar.gz").is_file():
        return folder / "cifar-100-python.tar.gz"
    return None


def read_folders(train_source: Path, test_source: Path, classes: tuple[str, ...], size=(32, 32)):
    """Decode ``<split>/<class>/<file>`` images from folders or archives, through the cache.

    The cache key is computed without opening archives (path, size, mtime), so a cache hit
    costs one .npz read and no decompression.
    """
    sources = (("train", train_source), ("test", test_source))

    def fingerprint(source: Path):
        if source.is_dir():
            tree = DirTree(source)
            return tree.fingerprint(tree.names())
        return file_fingerprint(source)

    def build():
        arrays = {}
        for split, source in sources:
            tree = open_tree(source, keep=lambda name, s=split: name.startswith(f"{s}/"))
            names, labels = class_files(tree, "" if isinstance(tree, DirTree) else f"{split}/", classes)
            arrays[f"{split}_images"] = decode_images(tree, names, size)
            arrays[f"{split}_labels"] = labels
        return arrays

    key = [list(classes), list(size), [fingerprint(source) for _, source in sources]]
    arrays = cached("cifar10-folders", key, build)
    return (ImageSet.from_numpy(arrays["train_images"], arrays["train_labels"]),
            ImageSet.from_numpy(arrays["test_images"], arrays["test_labels"]))  # fmt: skip


@register_dataset("cifar10", summary="10-class 32x32 RGB natural images, 50k/10k",
                  paper="Krizhevsky 2009")  # fmt: skip
def cifar10(data_dir=None, download=True) -> Official:
    (kind, source), _ = locate(CIFAR10, probe_cifar10, data_dir, download)
    if kind == "pickles":
        tree = open_tree(source, keep=lambda name: name.rsplit("/", 1)[-1] in CIFAR10_TRAIN + CIFAR10_TEST)
        train = read_batches(tree, CIFAR10_TRAIN, "labels", 10)
        test = read_batches(tree, CIFAR10_TEST, "labels", 10)
        origin = str(source)
    else:
        train, test = read_folders(*source, CIFAR10_CLASSES)
        origin = f"image folders {source[0]}, {source[1]}"
    return Official(train, test, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    CIFAR10_CLASSES, origin)  # fmt: skip


@register_dataset("cifar100", summary="100-class 32x32 RGB natural images (fine labels), 50k/10k",
                  paper="Krizhevsky 2009")  # fmt: skip
def cifar100(data_dir=None, download=True) -> Official:
    source, _ = locate(CIFAR100, probe_cifar100, data_dir, download)
    tree = open_tree(source, keep=lambda name: name.rsplit("/", 1)[-1] in ("train", "test"))
    train = read_batches(tree, ("train",), "fine_labels", 100)
    test = read_batches(tree, ("test",), "fine_labels", 100)
    return Official(train, test, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    CIFAR100_CLASSES, str(source))  # fmt: skip


locatable(CIFAR10, probe_cifar10)
locatable(CIFAR100, probe_cifar100)
