"""One device choice for every command: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

``auto`` is the first CUDA device where CUDA is available, else the CPU. A CUDA device on a machine
without one (a CPU build of torch, or no GPU) and an index past the last GPU are one-line errors
that say what is available.
"""

from __future__ import annotations

import re
from typing import Annotated

import torch
from pydantic import AfterValidator

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """``name`` if it is one of the accepted forms (whether it exists is checked on use)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"unknown device {name!r}; use {DEVICE_CHOICES}")
    return name


#: a schema field holding a device name, checked by :func:`check_device_name` (every command's ``--device``)
DeviceName = Annotated[str, AfterValidator(lambda v: check_device_name(v))]


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``name`` (see the module doc)."""
    if isinstance(name, torch.device):
        name = str(name)
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} requested but this machine has {count} CUDA device(s): "
                             f"cuda:0..cuda:{count - 1}")
    return device
