"""Where dataset files are found, and how they are downloaded.

A ``data_dir`` given by the caller is strict: the folder itself, then ``<data_dir>/<name>``, and
nothing else (a wrong folder must not silently fall back to another copy). Without one, places are
tried in this order, and the first folder holding a complete copy wins:

1. (``data_dir``, when given: the only place);
2. ``$CREDITFLOW_DATA`` (``<folder>/<name>``, then the folder itself; several folders may be
   joined with ``os.pathsep``);
3. the user cache, ``<cache>/<name>`` with ``<cache>`` = ``$CREDITFLOW_CACHE`` or
   ``~/.cache/creditflow``;
4. system folders, ``/usr/share/datasets/<name>`` (Debian's ``dataset-*`` packages);
5. a download into ``<cache>/<name>`` when ``download=True``, checked against the published
   checksum and written atomically (a ``.part`` file renamed into place), so an interrupted or
   corrupt download never leaves a file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from .errors import ChecksumError, DatasetError, DatasetNotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

#: System folders searched for ``<folder>/<name>``; tests replace this list.
SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets")]

#: The function that opens a URL; tests replace it to stay offline.
urlopen = urllib.request.urlopen

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One downloadable file with its published checksum.

    Attributes:
        filename: name the file is stored under.
        urls: mirrors, tried in order.
        md5, sha256: published digests (at least one is required to download).
    """

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Where:
    """How to find one dataset and what to tell a user who has none of it.

    Attributes:
        name: registry name, also the sub-folder name looked for.
        expects: the files a folder must hold, for the not-found message.
        how_to: how to get the files by hand.
        resources: files to download when ``download=True`` (empty: never downloads).
    """

    name: str
    expects: str
    how_to: str
    resources: tuple[Resource, ...] = ()


def cache_root() -> Path:
    """The user cache: ``$CREDITFLOW_CACHE``, else ``$XDG_CACHE_HOME/creditflow``, else
    ``~/.cache/creditflow``."""
    if os.environ.get("CREDITFLOW_CACHE"):
        return Path(os.environ["CREDITFLOW_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "creditflow"


def candidates(name: str, data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """Folders to look in, in order, each with the reason it is looked at."""
    places: list[tuple[Path, str]] = []
    if data_dir is not None:  # strict: the caller said where the data are
        root = Path(data_dir).expanduser()
        return [(root, "data_dir"), (root / name, "data_dir")]
    for folder in filter(None, os.environ.get("CREDITFLOW_DATA", "").split(os.pathsep)):
        root = Path(folder).expanduser()
        places += [(root / name, "$CREDITFLOW_DATA"), (root, "$CREDITFLOW_DATA")]
    places.append((cache_root() / name, "user cache"))
    places += [(Path(folder) / name, "system") for folder in SYSTEM_DIRS]
    return places


#: ``{name: (where, probe)}`` of every dataset found on disk, registered by its loader module
#: (:func:`locatable`), so :func:`find_local` can say what is present without reading it.
LOCATABLE: dict[str, tuple[Where, Callable[[Path], object | None]]] = {}


def locatable(where: Where, probe: Callable[[Path], object | None]) -> None:
    LOCATABLE[where.name] = (where, probe)


def find_local(name: str, data_dir: str | os.PathLike | None = None) -> tuple[Path, str] | None:
    """The folder a load would read ``name`` from, and why it is looked at, without reading or
    downloading anything; None when no searched folder holds a complete copy."""
    where, probe = LOCATABLE[name]
    for folder, why in candidates(where.name, data_dir):
        if folder.is_dir() and probe(folder) is not None:
            return folder, why
    return None


def locate(
    where: Where,
    probe: Callable[[Path], T | None],
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[T, Path]:
    """Find a complete copy of a dataset, downloading it if allowed.

    Args:
        where: the dataset's name, expected files and download resources.
        probe: returns what the loader needs from a folder (paths, a layout) or ``None``
            when the folder does not hold a complete copy. It must not raise for a folder
            that merely lacks the files.
        data_dir: folder given by the caller, tried first.
        download: fetch ``where.resources`` into the user cache when nothing is found.

    Returns:
        (what ``probe`` returned, the folder it was found in).

    Raises:
        DatasetNotFound: nothing found and download off, impossible, or failed.
        ChecksumError: every mirror served a file with the wrong checksum.
    """
    looked = []
    for folder, why in candidates(where.name, data_dir):
        if folder.is_dir():
            found = probe(folder)
            if found is not None:
                log.info("dataset %s: using %s (%s)", where.name, folder, why)
                return found, folder
            looked.append(f"{folder} ({why}, incomplete)")
        else:
            looked.append(f"{folder} ({why}, missing)")

    if data_dir is not None:
        raise DatasetNotFound(
            f"dataset {where.name!r} not in --data-dir {data_dir}: looked in {'; '.join(looked)}; expected "
            f"{where.expects}; to get it: {where.how_to}; or leave --data-dir out to search $CREDITFLOW_DATA, the "
            "user cache and system folders" + (" (and download)" if where.resources else ""))
    failure = "downloads are off (--no-download)"
    if download and where.resources:
        folder = cache_root() / where.name
        try:
            for resource in where.resources:
                if not (folder / resource.filename).exists():
                    fetch(resource, folder)
        except _DownloadFailed as err:
            failure = f"download failed: {err}"
        else:
            found = probe(folder)
            if found is not None:
                return found, folder
            failure = f"downloaded files in {folder} do not form a complete copy"
    elif download:
        failure = "no download available"
    firsts = [r.urls[0] for r in where.resources]  # one URL, or the folder of several
    urls = ", ".join(firsts if len(firsts) < 2 else sorted({u.rsplit("/", 1)[0] + "/" for u in firsts}))
    raise DatasetNotFound(
        f"dataset {where.name!r} not found; looked in: {'; '.join(looked)}; {failure}; "
        f"expected {where.expects}; to get it: {where.how_to}"
        + (f"; or let it download (--download; {urls})" if urls and not download else "")
    )


# -- what was read: recorded while a dataset loads, so a run can say which files its numbers come from --

_READS: contextvars.ContextVar[list | None] = contextvars.ContextVar("creditflow_data_reads", default=None)


def note(path: str | os.PathLike, tree: str | os.PathLike | None = None) -> None:
    """Record that ``path`` is read (every reader of dataset files calls this); ``tree``: the folder
    of many files it is one of (an image-folder dataset), recorded as one entry."""
    reads = _READS.get()
    if reads is not None:
        reads.append((Path(path), None if tree is None else Path(tree)))


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """The files :func:`note`\\ d inside the block, in order."""
    token = _READS.set([])
    try:
        yield _READS.get()
    finally:
        _READS.reset(token)


def describe_reads(reads: list) -> tuple[dict, ...]:
    """``({"path", "bytes", "sha256"}, ...)`` per file read; the files of one tree are one entry with
    ``files`` (their count) and the sha256 of their relative names and digests."""
    entries: list[dict] = []
    trees: dict[Path, dict] = {}
    for path, tree in dict.fromkeys(reads):
        if tree is None:
            entries.append({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": _sha256(path)})
            continue
        if tree not in trees:
            trees[tree] = {"path": str(tree.resolve()), "files": 0, "bytes": 0, "sha256": hashlib.sha256()}
            entries.append(trees[tree])
        entry = trees[tree]
        entry["files"] += 1
        entry["bytes"] += path.stat().st_size
        entry["sha256"].update(f"{path.relative_to(tree).as_posix()} {_sha256(path)}\n".encode())
    for entry in trees.values():
        entry["sha256"] = entry["sha256"].hexdigest()
    return tuple(entries)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _DownloadFailed(DatasetError):
    """Every mirror of a file failed for network reasons."""


def fetch(resource: Resource, folder: Path) -> Path:
    """Download ``resource`` into ``folder``, verify its checksum, then rename it into place.

    Raises:
        ChecksumError: a mirror served bytes with the wrong digest (the bytes are deleted).
        _DownloadFailed: every mirror failed to serve the file.
    """
    if not (resource.md5 or resource.sha256):
        raise DatasetError(f"refusing to download {resource.filename}: no published checksum")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / resource.filename
    part = folder / f".{resource.filename}.{os.getpid()}.part"
    checksum_errors, network_errors = [], []
    for url in resource.urls:
        try:
            log.info("downloading %s", url)
            digests = _stream(url, part, resource.filename)
            for algorithm, expected in (("md5", resource.md5), ("sha256", resource.sha256)):
                if expected and digests[algorithm] != expected.lower():
                    raise ChecksumError(
                        f"checksum mismatch for {url}: expected {algorithm} {expected}, "
                        f"got {digests[algorithm]}; the download was discarded"
                    )
            os.replace(part, target)
            return target
        except ChecksumError as err:
            checksum_errors.append(err)
        except OSError as err:  # URLError, HTTPError, timeouts, disk full
            network_errors.append(f"{url}: {err}")
        finally:
            part.unlink(missing_ok=True)
    if checksum_errors:
        raise checksum_errors[0]
    raise _DownloadFailed("; ".join(network_errors))


def _stream(url: str, part: Path, label: str) -> dict[str, str]:
    """Copy ``url`` to ``part``, hashing as it goes; returns md5 and sha256."""
    from tqdm import tqdm

    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with urlopen(url, timeout=60) as response, open(part, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                md5.update(block)
                sha256.update(block)
                bar.update(len(block))
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}
