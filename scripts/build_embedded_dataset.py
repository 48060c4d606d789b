"""Build the embedded ``fashion-mnist-mini`` dataset from the official Fashion-MNIST IDX files.

    python scripts/build_embedded_dataset.py --source /usr/share/datasets/fashion-mnist \
        --out src/creditflow/data/embedded/fashion_mnist_mini.npz

Selection: with ``numpy.random.default_rng(seed)`` (seed 0), for each class 0..9 in turn draw
``--train-per-class`` indices without replacement from the official training set, then the same
for ``--test-per-class`` from the official test set; indices are kept in official order.

The output is byte-for-byte reproducible: the .npz (a zip of .npy files, as ``np.load`` reads)
is written with a fixed member order, a fixed timestamp and fixed compression settings, where
``np.savez_compressed`` would stamp the current time. The licence notice is written next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from creditflow.data.idx import read_pair  # noqa: E402  (the package's own validated reader)
from creditflow.data.mnist import probe  # noqa: E402

MAX_BYTES = 6 * 1024 * 1024
LICENSE = """\
# Fashion-MNIST licence

`fashion_mnist_mini.npz` is a subset of Fashion-MNIST (Xiao, Rasul and Vollgraf 2017,
https://github.com/zalandoresearch/fashion-mnist), redistributed under its MIT licence:

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

## What this subset is

{train} training images ({train_per} per class) drawn from the official 60,000-image training
set and {test} test images ({test_per} per class) from the official 10,000-image test set, chosen
with `numpy.random.default_rng({seed})`, class by class, without replacement, kept in official
order. Pixels and labels are unchanged (uint8, 28x28). Built by
`scripts/build_embedded_dataset.py --source <official IDX files>`; arrays `train_images`
({train}, 28, 28), `train_labels` ({train},), `test_images` ({test}, 28, 28), `test_labels`
({test},). sha256 of the .npz: {sha256}.
"""


def choose(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of each class, drawn without replacement, in ascending order."""
    picks = []
    for c in range(10):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise SystemExit(f"class {c} has only {len(pool)} images, {per_class} requested")
        picks.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> bytes:
    """Write arrays as a deterministic compressed .npz and return its bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue(), compresslevel=9)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, type=Path, help="folder with the official IDX files")
    parser.add_argument("--out", required=True, type=Path, help="output .npz")
    parser.add_argument("--train-per-class", type=int, default=800)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    files = probe(args.source)
    if files is None:
        raise SystemExit(f"no Fashion-MNIST IDX files in {args.source}")
    train_x, train_y = read_pair(files[0], files[1], 10)
    test_x, test_y = read_pair(files[2], files[3], 10)
    rng = np.random.default_rng(args.seed)
    train = choose(train_y, args.train_per_class, rng)
    test = choose(test_y, args.test_per_class, rng)
    arrays = {
        "train_images": train_x[train, 0], "train_labels": train_y[train].astype(np.uint8),
        "test_images": test_x[test, 0], "test_labels": test_y[test].astype(np.uint8),
    }  # fmt: skip
    data = write_npz(args.out, arrays)
    sha256 = hashlib.sha256(data).hexdigest()
    (args.out.parent / "LICENSE-fashion-mnist.md").write_text(
        LICENSE.format(train=len(train), test=len(test), train_per=args.train_per_class,
                       test_per=args.test_per_class, seed=args.seed, sha256=sha256)  # fmt: skip
    )
    print(f"{args.out}: {len(data)} bytes, {len(train)} train + {len(test)} test images")
    print(f"sha256 {sha256}")
    if len(data) > MAX_BYTES:
        raise SystemExit(f"{args.out} is {len(data)} bytes, over the {MAX_BYTES}-byte budget")


if __name__ == "__main__":
    main()
