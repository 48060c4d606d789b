"""Run folders: claimed by one process at a time, never overwritten by another run.

``with claim(folder, config, resume=..., overwrite=...)`` (``config``: the run's pydantic schema):

1. refuses a folder that is a file, or under one;
2. takes an exclusive ``fcntl.flock`` on ``folder/.lock``: the kernel drops it when the process
   ends, however it ends, so a killed run never leaves a folder locked, and a second run started
   into the same folder refuses in one line while the first holds it;
3. removes ``.*.tmp`` files a killed atomic write left (safe: nobody else writes here now);
4. compares ``config`` with the folder's ``config.yaml``: another run's folder is refused, naming
   the differing keys and the ways out (``--resume``, another ``--out``, ``--overwrite``, and
   ``--extend`` where only ``epochs`` grew); ``overwrite`` deletes the run files instead;
5. on a failure, removes a folder it created that holds nothing of value (no metrics, no checkpoint).

The lock file stays (deleting it would let a process that opened the old file and one that
creates a new one both hold "the" lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .config import PLACEMENT_KEYS, schema_defaults

LOCK = ".lock"
#: what a run folder holds that --overwrite removes (never anything else a user put there)
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "curves.png", "curves.svg",
             "results.json", "results.csv", "results.md")
#: a failed start leaves only these: the folder goes
NOTHING_OF_VALUE = {LOCK, "config.yaml"}


class RunFolderError(ValueError):
    """A run folder that cannot be used: a file, busy, or holding another run."""


def config_diff(saved: dict[str, Any], now: BaseModel, ignore=PLACEMENT_KEYS, exclude=frozenset()) -> list[str]:
    """``["lr 0.001 -> 0.5", ...]``: every key (but ``ignore``) in which a saved config and ``now`` differ.

    A key the saved config lacks and ``now`` holds at its schema default is an option added since
    that run was made, which then ran as the default does: not a difference. ``exclude``: fields of
    ``now`` that a saved config never holds.
    """
    current = now.model_dump(mode="json", exclude=set(exclude))
    defaults = schema_defaults(type(now))

    def same(k):
        if k not in saved and k in defaults and current.get(k) == defaults[k]:
            return True
        return saved.get(k) == current.get(k)

    keys = sorted(k for k in saved.keys() | current.keys() if k not in ignore and not same(k))
    return [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys]


@contextlib.contextmanager
def claim(folder: str | Path, config: BaseModel | None, *, resume: bool = False, overwrite: bool = False,
          extend: bool = False, restart: bool = False, ignore=PLACEMENT_KEYS, exclude=frozenset()) -> Iterator[Path]:
    """Hold ``folder`` for one run of ``config`` for the ``with`` block (``None``: only lock it).

    ``restart``: the folder's run of this same config starts over (its run files go); ``overwrite``:
    any run's files go, whatever its config.

    ``ignore``: keys that may differ from the folder's saved config (where the work runs, not what it
    computes); ``exclude``: fields of ``config`` that its saved form leaves out.
    """
    folder = Path(folder)
    created = not folder.exists()
    _make(folder)
    fd = _lock(folder)
    try:
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
        else:
            if config is not None:
                _check_config(folder, config, resume, extend, ignore, exclude)
            if restart:
                for name in RUN_FILES:
                    (folder / name).unlink(missing_ok=True)
        yield folder
    except BaseException:
        if created and {p.name for p in folder.iterdir()} <= NOTHING_OF_VALUE:
            shutil.rmtree(folder, ignore_errors=True)  # a failed start leaves no empty folder
        raise
    finally:
        os.close(fd)  # releases the lock


def finished_summary(folder: str | Path, epochs: int) -> dict[str, Any] | None:
    """The summary of a run in ``folder`` that trained all ``epochs``, else ``None``.

    A finished run is its ``summary.json`` and ``metrics.jsonl`` of every epoch; its checkpoint may be
    gone (committed reports keep no checkpoints), so a re-run reads it back instead of training it again.
    """
    folder = Path(folder)
    path, metrics = folder / "summary.json", folder / "metrics.jsonl"
    if not (path.is_file() and metrics.is_file()):
        return None
    try:
        summary = json.loads(path.read_text())
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return summary if summary.get("epochs") == epochs and len(rows) >= epochs else None


def _make(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), folder)
        raise RunFolderError(f"cannot create run folder {folder}: {blocker} is a file; choose another --out") from None


def _lock(folder: Path) -> int:
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"run folder {folder} is in use by another creditflow run (pid {holder}); wait "
                                 "for it to finish or choose another --out") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _check_config(folder: Path, config: BaseModel, resume: bool, extend: bool, ignore, exclude) -> None:
    path = folder / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise RunFolderError(f"{path} is not valid YAML: this folder's run cannot be identified; choose another "
                             "--out, or pass --overwrite to replace it") from None
    if extend:
        epochs = getattr(config, "epochs", 0)
        if epochs <= saved.get("epochs", 0):
            raise RunFolderError(f"--extend needs more epochs than the run in {folder} has ({saved.get('epochs')}), "
                                 f"got {epochs}")
        ignore = ignore | {"epochs"}
    diff = config_diff(saved, config, ignore, exclude)
    if not diff:
        return
    longer = " or --extend to train it longer" if [d.split()[0] for d in diff] == ["epochs"] else ""
    if resume:
        raise RunFolderError(f"cannot resume {folder}: its config differs in {', '.join(diff)}; use the saved "
                             f"config.yaml (--config {path}){longer}, choose another --out, or pass --overwrite to "
                             "start it again")
    raise RunFolderError(f"{folder} holds another run: its config differs in {', '.join(diff)}; continue it with "
                         f"--resume --config {path}{longer}, choose another --out, or pass --overwrite to replace it")


__all__ = ["RunFolderError", "claim", "config_diff", "finished_summary"]
