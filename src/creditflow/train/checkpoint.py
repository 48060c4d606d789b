"""Resumable checkpoints, written atomically (:mod:`creditflow.files`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write, write_json, write_text  # noqa: F401  (re-exported)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # a corrupt file should say which file, not fail deep in pickle
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
