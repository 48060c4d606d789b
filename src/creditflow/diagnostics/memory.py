"""Memory held for the backward pass, measured the same way on every device.

Activation memory is what separates credit-assignment rules: every tensor autograd saves
during the forward pass stays alive until the backward pass has used it. We count those
tensors with ``torch.autograd.graph.saved_tensors_hooks``:

* each distinct storage counts once (a ReLU output that is also the next Linear's input, or a
  detached view of it, is one buffer, not two), at its full ``nbytes``;
* a storage stops counting when the graph drops its last saved reference (the backward pass
  frees saved tensors node by node), so the figure is a true *peak*, not a sum of saves;
* storages of the model's own parameters and buffers can be left out (``exclude=``): autograd
  saves a *reference* to ``W`` wherever ``W^T delta`` is needed, which holds no extra memory.

The count is exact and device independent, which is what we report on CPU, where PyTorch keeps
no allocator peak and process RSS is blurred by the C allocator's caching. On CUDA
:func:`peak_memory` adds the allocator's peak as well.

References: PyTorch docs, "Hooks for saved tensors" (autograd mechanics note).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["MemoryReport", "peak_memory", "saved_tensor_bytes"]


@dataclass(frozen=True)
class MemoryReport:
    """Memory one call needed beyond what existed before it.

    Attributes:
        saved_for_backward_bytes: peak bytes of distinct storages autograd held for backward at
            once (parameters and buffers left out when ``exclude`` was given). Device independent.
        device_peak_bytes: CUDA only: ``max_memory_allocated`` during the call minus the bytes
            allocated before it (activations, gradients, optimizer state created, workspace).
            ``None`` on CPU, which has no allocator peak to read.
    """

    saved_for_backward_bytes: int
    device_peak_bytes: int | None


def _state_storages(exclude: nn.Module | Iterable[Tensor] | None) -> set[tuple]:
    """Storage keys of every parameter and buffer of a module (frozen ones too), or of given tensors."""
    if exclude is None:
        return set()
    if isinstance(exclude, nn.Module):
        tensors: Iterable[Tensor] = itertools.chain(exclude.parameters(), exclude.buffers())
    else:
        tensors = exclude
    return {_storage_key(t)[0] for t in tensors}


def _storage_key(t: Tensor) -> tuple[tuple, int]:
    """(key, nbytes) of the storage behind ``t``; tensors without one (sparse) count by size."""
    try:
        s = t.untyped_storage()
        return (t.device, s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return ("tensor", id(t)), t.nelement() * t.element_size()


class _Tracker:
    """Live bytes of saved storages, refcounted per storage; ``peak`` is the running maximum."""

    def __init__(self, skip: set[tuple]):
        self.skip = skip
        self.refs: dict[tuple, list[int]] = {}  # key -> [references held by the graph, nbytes]
        self.live = 0
        self.peak = 0
        # The CUDA backward runs on autograd's device threads, which release saved tensors there.
        # Reentrant: the garbage collector may finalize a _Saved while this thread holds the lock.
        self.lock = threading.RLock()

    def pack(self, t: Tensor) -> object:
        key, nbytes = _storage_key(t)
        if key in self.skip:
            return t
        with self.lock:
            entry = self.refs.get(key)
            if entry is None:
                self.refs[key] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            else:
                entry[0] += 1
        return _Saved(t, key, self)

    def release(self, key: tuple) -> None:
        with self.lock:
            entry = self.refs[key]
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.refs[key]


class _Saved:
    """What the graph holds instead of the tensor; its deletion marks the save as released.

    It keeps ``t`` alive, so the storage cannot be freed (and its address reused) while counted.
    """

    __slots__ = ("t", "key", "tracker")

    def __init__(self, t: Tensor, key: tuple, tracker: _Tracker):
        self.t, self.key, self.tracker = t, key, tracker

    def __del__(self):
        self.tracker.release(self.key)


def _unpack(packed: object) -> Tensor:
    return packed.t if isinstance(packed, _Saved) else packed


def saved_tensor_bytes(fn: Callable[[], object],
                       exclude: nn.Module | Iterable[Tensor] | None = None) -> int:
    """Peak bytes of tensors saved for backward that were alive at once while ``fn()`` ran.

    For one training step (forward then backward) the peak is reached at the end of the
    forward pass. Graphs that outlive ``fn`` (a returned loss not yet back-propagated) still
    count, since the peak is recorded as tensors are saved.

    Args:
        fn: the call to measure, e.g. ``lambda: rule.step(x, y)``.
        exclude: a module whose parameters and buffers (or an iterable of tensors) are state,
            not activations; their storages are not counted.

    Example: ``nn.Linear(a, b)`` on an (N, a) float32 input that needs no gradient saves only
    the input, N*a*4 bytes; with an input that needs one it also saves ``W`` (a*b*4), unless
    ``exclude`` names the layer.
    """
    tracker = _Tracker(_state_storages(exclude))
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, _unpack):
        fn()
    return tracker.peak


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None,
                exclude: nn.Module | Iterable[Tensor] | None = None) -> MemoryReport:
    """Saved-for-backward peak of ``fn()`` and, on CUDA, the allocator's peak during it.

    ``fn`` runs twice on CUDA: once under the saved-tensor hooks and once without them, so the
    allocator peak does not include the hooks' own bookkeeping. Both runs have the side effects
    of ``fn`` (a training step fills ``.grad`` twice; zero it before stepping the optimizer).

    Args:
        fn: the call to measure.
        device: where ``fn`` computes; only ``"cuda"`` devices give ``device_peak_bytes``.
        exclude: see :func:`saved_tensor_bytes`.
    """
    saved = saved_tensor_bytes(fn, exclude)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return MemoryReport(saved, None)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return MemoryReport(saved, torch.cuda.max_memory_allocated(device) - before)
