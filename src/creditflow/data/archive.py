"""One read-only view of files in a folder, a tar archive or a zip archive.

Loaders for image-folder datasets ask for names and bytes and never care whether the user
extracted the archive: ``train.tar.gz`` and ``train/`` read the same.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from .errors import DatasetError
from .sources import note

_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)


def file_fingerprint(path: Path) -> list:
    """Resolved path, size and mtime: changes whenever the file is replaced or edited."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


class Tree:
    """Files by relative POSIX path ('train/cat/0001.png').

    Attributes:
        origin: the folder or archive, for messages.
    """

    origin: Path

    def names(self) -> list[str]:
        """Every file's relative path, sorted."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        """The bytes of one file."""
        raise NotImplementedError

    def fingerprint(self, names: list[str]) -> list:
        """What identifies the content for the decoded-array cache: path, sizes, mtimes."""
        return file_fingerprint(self.origin)


class DirTree(Tree):
    """Files under an extracted folder."""

    def __init__(self, root: str | os.PathLike):
        self.origin = Path(root)

    def names(self) -> list[str]:
        out = []
        for folder, _, files in os.walk(self.origin):
            rel = Path(folder).relative_to(self.origin).as_posix()
            prefix = "" if rel == "." else rel + "/"
            out += [prefix + f for f in files]
        return sorted(out)

    def read(self, name: str) -> bytes:
        note(self.origin / name, tree=self.origin)
        return (self.origin / name).read_bytes()

    def fingerprint(self, names: list[str]) -> list:
        # A folder's own mtime misses edits inside it, so every file used is part of the key.
        stats = [(self.origin / n).stat() for n in names]
        return [str(self.origin.resolve()), [(n, s.st_size, s.st_mtime_ns) for n, s in zip(names, stats)]]


class TarTree(Tree):
    """Files inside a .tar / .tar.gz, read into memory once (gzip streams cannot seek)."""

    def __init__(self, path: str | os.PathLike, keep: Callable[[str], bool] = lambda name: True):
        self.origin = Path(path)
        note(self.origin)
        self._files: dict[str, bytes] = {}
        try:
            with tarfile.open(self.origin, "r:*") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isfile() and keep(name):
                        self._files[name] = tar.extractfile(member).read()
        except _ARCHIVE_ERRORS as err:
            raise DatasetError(f"corrupt or truncated archive {self.origin}: {err}") from None

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, name: str) -> bytes:
        return self._files[name]


class ZipTree(Tree):
    """Files inside a .zip, read on demand (zip archives can seek)."""

    def __init__(self, path: str | os.PathLike):
        self.origin = Path(path)
        note(self.origin)
        try:
            self._zip = zipfile.ZipFile(self.origin)
        except _ARCHIVE_ERRORS as err:
            raise DatasetError(f"corrupt or truncated archive {self.origin}: {err}") from None

    def names(self) -> list[str]:
        return sorted(n for n in self._zip.namelist() if not n.endswith("/"))

    def read(self, name: str) -> bytes:
        try:
            return self._zip.read(name)
        except _ARCHIVE_ERRORS as err:
            raise DatasetError(f"corrupt archive {self.origin} at {name}: {err}") from None


def is_archive(path: Path) -> bool:
    """True for the archive suffixes ``open_tree`` reads."""
    return path.name.endswith((".tar.gz", ".tgz", ".tar", ".zip"))


def open_tree(path: str | os.PathLike, keep: Callable[[str], bool] = lambda name: True) -> Tree:
    """A ``Tree`` for a folder, a tar archive or a zip archive (``keep`` filters tar members)."""
    path = Path(path)
    if path.is_dir():
        return DirTree(path)
    if path.name.endswith(".zip"):
        return ZipTree(path)
    if is_archive(path):
        return TarTree(path, keep)
    raise DatasetError(f"{path} is neither a folder nor a .tar, .tar.gz, .tgz or .zip archive")
