"""A disk cache of decoded uint8 arrays, for datasets stored as many small image files.

Decoding 60,000 CIFAR JPEGs takes about 15 s; loading the same pixels from an uncompressed
.npz takes well under one. Entries live in ``<cache>/decoded/`` and are keyed by the source's
fingerprint (paths, sizes, mtimes), so editing or replacing the files makes a new entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .sources import cache_root, note

log = logging.getLogger(__name__)

#: Bump when the decoded layout changes, so stale entries are never read.
FORMAT = 1


def cache_path(tag: str, key) -> Path:
    """Where the entry for ``key`` (any JSON-able value) is stored."""
    digest = hashlib.sha256(json.dumps([FORMAT, tag, key], sort_keys=True).encode()).hexdigest()
    return cache_root() / "decoded" / f"{tag}-{digest[:20]}.npz"


def cached(tag: str, key, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the arrays stored under ``key``, building and storing them on a miss.

    A damaged entry is rebuilt; a cache folder that cannot be written only costs a warning.
    """
    path = cache_path(tag, key)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                note(path)  # the run reads this decoded copy, not the source files
                return {name: stored[name] for name in stored.files}
        except Exception as err:  # truncated or foreign file: rebuild it
            log.warning("ignoring unreadable cache entry %s: %s", path, err)
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with open(part, "wb") as f:  # a file object: np.savez would append '.npz' to a name
                np.savez(f, **arrays)
            os.replace(part, path)  # readers see the whole entry or none
        finally:
            part.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not write cache entry %s: %s", path, err)
    return arrays
