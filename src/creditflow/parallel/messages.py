"""What ranks of one run send each other besides the data channels: tensors and plain data only.

Trust model: the ranks of a run are processes of one user started by one launch (spawned here, or
by ``torchrun`` across machines), but a byte stream from a socket is still never unpickled into
arbitrary objects. Every object message (a checkpoint shared from rank 0, a plan, per-stage
states and statistics, a worker's result) is ``torch.save``'d on one side and read with
``torch.load(weights_only=True)`` on the other, which builds tensors, numbers, strings, lists,
tuples and dicts and refuses anything else. Senders therefore pass plain data: a NamedTuple goes
as its ``_asdict()``, a ``range`` as ``[start, stop]``. (The launcher's result pipe to its own
children is a local pipe, not a file or a socket; see :mod:`creditflow.parallel.launch`.)
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist


def pack(obj: Any) -> bytes:
    """``obj`` (tensors and plain data) as bytes. Tensors in a worker's result would otherwise
    travel as shared-memory handles that die with the worker (torch.multiprocessing's pickler)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    """What :func:`pack` packed; a message naming any class or function is refused (UnpicklingError)."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _device(group) -> torch.device:
    """Where a collective's buffers live: the GPU of this rank for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: Any, group=None, src: int = 0) -> Any:
    """``src``'s ``obj`` on every rank of ``group`` (two broadcasts: the size, then the bytes)."""
    device = _device(group)
    data = _as_tensor(pack(obj)) if dist.get_rank() == src else None
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=src, group=group)
    buf = data.to(device) if data is not None else torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=src, group=group)
    return obj if data is not None else unpack(buf.cpu().numpy().tobytes())


def gather(obj: Any, group=None, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` on ``dst``, in rank order (None elsewhere); messages are padded to the longest."""
    device = _device(group)
    data = _as_tensor(pack(obj)).to(device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.long, device=device), group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(data)] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)] \
        if dist.get_rank() == dst else None
    dist.gather(padded, parts, dst=dst, group=group)
    if parts is None:
        return None
    return [unpack(p[:int(n)].cpu().numpy().tobytes()) for p, n in zip(parts, sizes)]


__all__ = ["broadcast", "gather", "pack", "unpack"]
