"""Keep for backward only what backward reads: ReLU as a boolean mask, max-pool as its argmax
positions, BatchNorm as its normalised input.

PyTorch's ``nn.ReLU`` saves its float output for backward. Under BP that costs nothing extra,
because the next layer saves the same tensor as its input. Under activation sharing (ASAP) the
next layer saves the *shared* activation instead, so the ReLU's output would stay alive for the
ReLU alone, although its backward reads only where the output is positive. :class:`MaskReLU`
saves that as one bit per element (the ``output > 0`` mask packed eight to a byte, 1/32 of the float
output) and unpacks it in backward; its gradients are those of ``nn.ReLU`` bit for bit (the mask is
what ``threshold_backward`` tests).
``nn.MaxPool2d`` saves its input too (its backward reads only the argmax positions and the input's
shape); :class:`IndexMaxPool2d` keeps the positions alone, as int32.

BatchNorm's backward reads the normalised input ``x_hat`` (and ``1/std``), a full-size tensor
that no rule can drop. :class:`CompactBatchNorm2d` saves ``x_hat`` itself, either in the input's
dtype (exact; the same bytes as the input PyTorch saves) or in ``bfloat16``, which halves them at
the cost of rounding ``x_hat`` to 8 significant bits *in the backward pass only* (the forward
output and the running statistics are exact). That is lossy compression of a saved activation (as ActNN, Chen et al. 2021, does more
aggressively), orthogonal to the rule, and so opt-in.

:func:`compact_activations` swaps the modules of a model in place; parameters, buffers,
state-dict keys and inference are unchanged.

References: PyTorch autograd ``threshold_backward`` and ``native_batch_norm_backward``; Jain et
al. 2018 ("Gist") on encoding ReLU outputs as masks; Chen et al. 2021 (ActNN).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_BITS = {}  # device -> the shifts 0..7 (uint8)


def _shifts(device) -> Tensor:
    if device not in _BITS:
        _BITS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _BITS[device]


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8, eight elements a byte (little-endian bit order), zero-padded."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return (flat.view(-1, 8).to(torch.uint8) << _shifts(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed."""
    bits = (packed[:, None] >> _shifts(packed.device)) & 1
    return bits.view(-1)[:shape.numel()].view(shape).bool()


class _MaskReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = torch.relu(x)
        ctx.save_for_backward(pack_bits(out > 0))  # one bit per element, not 32
        ctx.shape = out.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        (packed,) = ctx.saved_tensors
        return grad_out * unpack_bits(packed, ctx.shape)


class MaskReLU(nn.ReLU):
    """``nn.ReLU`` whose backward keeps a bit-packed mask instead of the float output.

    An ``nn.ReLU`` (isinstance holds), so code that looks for activations still finds it;
    ``inplace`` is ignored under autograd (the mask is all backward needs).
    """

    _plain_class = nn.ReLU  # what plain_copy turns it back into

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return _MaskReLUFn.apply(x)


class _IndexMaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel, stride, padding, dilation, ceil_mode) -> Tensor:
        out, index = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        # index: (N, C, H_out, W_out) flat positions in each input plane; int32 is enough below 2**31
        ctx.save_for_backward(index.to(torch.int32) if x[0, 0].numel() < 2 ** 31 else index)
        ctx.input_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad_x = grad_out.new_zeros(n, c, h * w)
        # every output position sends its gradient to the input that won its window (summed where
        # windows overlap), which is all max-pool's backward does; PyTorch's also keeps the input
        grad_x.scatter_add_(2, index.flatten(2).long(), grad_out.flatten(2))
        return grad_x.view(n, c, h, w), None, None, None, None, None


class IndexMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose backward keeps only the argmax positions (int32), not its input."""

    _plain_class = nn.MaxPool2d  # what plain_copy turns it back into

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad or x.ndim != 4 or self.return_indices:
            return super().forward(x)
        return _IndexMaxPoolFn.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                     self.ceil_mode)


class _SavedNormBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm over dims (0, 2, 3) that saves ``x_hat`` in ``saved_dtype``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, saved_dtype):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                    momentum, eps)  # updates the running stats
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x_hat = ((x - mean.view(shape)) * invstd.view(shape)).to(saved_dtype or x.dtype)
        ctx.save_for_backward(x_hat, weight, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, weight, invstd = ctx.saved_tensors
        x_hat = x_hat.to(grad_out.dtype)
        # BN's backward on x_hat with mean 0 and 1/std 1 is the true one once gamma carries 1/std:
        # grad_x = gamma/std (g - mean(g) - x_hat mean(g x_hat)); grad_gamma = sum(g x_hat).
        gamma = weight if weight is not None else torch.ones_like(invstd)
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out, x_hat, gamma * invstd, None, None, torch.zeros_like(invstd), torch.ones_like(invstd),
            True, 0.0, [need[0], need[1] and weight is not None, need[2]])
        return grad_x, grad_w, grad_b, None, None, None, None, None


class CompactBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode backward keeps ``x_hat`` in ``saved_dtype`` (None: the input's).

    Eval mode, or a norm without running statistics, is plain ``nn.BatchNorm2d``.
    """

    _plain_class = nn.BatchNorm2d  # what plain_copy turns it back into

    def __init__(self, *args, saved_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_dtype = saved_dtype

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats and torch.is_grad_enabled()):
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _SavedNormBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                           momentum, self.eps, self.saved_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, saved_dtype={self.saved_dtype}"


#: ``saved_norm`` values: PyTorch's BN (saves its input), or ``x_hat`` in the input's dtype or in bfloat16
SAVED_NORM = ("input", "normalized", "bfloat16")


def compact_activations(model: nn.Module, relu_mask: bool = True, saved_norm: str = "input") -> int:
    """Swap, in place, every ``nn.ReLU`` for :class:`MaskReLU` and ``nn.MaxPool2d`` for
    :class:`IndexMaxPool2d` (``relu_mask``) and, unless
    ``saved_norm`` is ``"input"`` (PyTorch's BN, which saves its input), every ``nn.BatchNorm2d``
    for a :class:`CompactBatchNorm2d` keeping ``x_hat`` (``"normalized"``: in the input's dtype,
    exact; ``"bfloat16"``: rounded, half the bytes of float32). Returns how many were swapped.

    Masks pay only where a ReLU's output is not saved by the next layer anyway (activation
    sharing); under BP a mask adds a byte per element beside a tensor that stays alive.
    """
    if saved_norm not in SAVED_NORM:
        raise ValueError(f"unknown saved_norm {saved_norm!r}; available: {', '.join(SAVED_NORM)}")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReLU and relu_mask:
                new: nn.Module = MaskReLU()
            elif type(child) is nn.MaxPool2d and relu_mask and not child.return_indices:
                # after a masked ReLU, a pool that saved its input would keep the float output alive
                new = IndexMaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation,
                                     ceil_mode=child.ceil_mode)
            elif type(child) is nn.BatchNorm2d and saved_norm != "input":
                new = CompactBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats, device="meta",
                                         saved_dtype=torch.bfloat16 if saved_norm == "bfloat16" else None)
                # the same Parameters and buffers move over: optimizers and state dicts see no change
                for key in ("weight", "bias"):
                    setattr(new, key, getattr(child, key))
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(new, key, getattr(child, key))
                new.train(child.training)
            else:
                continue
            setattr(parent, name, new)
            swapped += 1
    return swapped
