"""Resumable checkpoints, written atomically (:mod:`creditflow.files`) and read without running code.

A checkpoint holds tensors and plain data only (numbers, strings, lists, dicts: the rule's
``state_dict``, optimizer state by parameter name, RNG states, the config as JSON), so it loads with
``torch.load(weights_only=True)``. A file whose pickle names anything else (a class, a function: what
a ``__reduce__`` that runs a command needs) is refused before any of it is built: a run folder
someone shares cannot run code on the reader's machine.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write, write_json, write_text  # noqa: F401  (re-exported)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that holds more than tensors and plain data."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    # serialised in memory first: torch.save writing into a full disk raises a RuntimeError from its zip
    # writer that hides the cause; a plain write raises OSError(ENOSPC), which names the file
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph of advice to load with weights_only=False; the cause is its context
        why = _first_line(err.__context__ or err)
        if "GLOBAL" in why:  # the file asks to build an object: no checkpoint of ours does
            raise CheckpointError(f"refusing to load checkpoint {path}: it holds more than tensors and plain "
                                  f"data ({why}); creditflow never writes such a file") from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a checkpoint file ({why})") from None
    except Exception as err:  # a torn or foreign file should name the file, not fail deep in the zip reader
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    if not isinstance(state, dict) or not {"epoch", "config", "rule"} <= state.keys():
        raise CheckpointError(f"{path} is not a creditflow checkpoint (no epoch, config and rule entries)")
    return state


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__
