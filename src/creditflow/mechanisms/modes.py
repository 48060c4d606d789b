"""Train/eval mode switches that restore every module's own mode afterwards, and the eval-mode
probes that read a model's shapes from a batch of zeros."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside; afterwards every submodule gets back the mode it had (a model may
    keep some parts in eval on purpose, so one ``train(was)`` would not restore it)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def probe_batch(modules: nn.Module | Sequence[nn.Module], input_shape: Sequence[int], batch: int = 2) -> Tensor:
    """Zeros ``(batch, *input_shape)`` on the device and dtype of the first parameter of ``modules``
    (CPU, default dtype, without one); token ids (int64) where the first module with parameters is an
    ``nn.Embedding`` (a language model). Two samples by default: a layer that drops the batch axis shows."""
    modules = [modules] if isinstance(modules, nn.Module) else modules
    owner = next((m for top in modules for m in top.modules() if next(m.parameters(False), None) is not None), None)
    first = next(owner.parameters(False)) if owner is not None else None
    place = {"device": first.device, "dtype": first.dtype} if first is not None else {}
    if isinstance(owner, nn.Embedding):
        place["dtype"] = torch.long
    return torch.zeros(batch, *input_shape, **place)


@torch.no_grad()
def block_output_shapes(blocks: Sequence[nn.Module], input_shape: Sequence[int]) -> list[torch.Size]:
    """Per-sample output shape of each block, the blocks run in turn on :func:`probe_batch` in eval
    mode (BatchNorm must not learn from the probe)."""
    h = probe_batch(blocks, input_shape)
    shapes = []
    for block in blocks:
        with eval_mode(block):
            h = block(h)
        shapes.append(h.shape[1:])
    return shapes
