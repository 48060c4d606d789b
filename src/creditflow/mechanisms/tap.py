"""The output tap: a rule's update driven by whatever loss the caller builds from its output.

``out = tap(logits, on_error, anchors)`` returns ``logits`` unchanged. When autograd reaches it
from *any* loss, its backward hands ``e = dL/d out`` (whatever the loss and the output's shape) to
``on_error(e)``, which returns the gradient for ``logits`` and one for each anchor: the tensors a
rule wants to receive a gradient of its own choosing in the same backward pass (a direct rule's
block outputs ``h_i`` get their signals ``B_i e``; a rule's own loss gets its seed). So a plain
``loss.backward()`` on a rule's output is the rule's update, one engine pass, no second call, and
gradients accumulate and scale with the loss exactly as autograd's do.

``after_backward(fn)`` queues ``fn`` to run when the current backward pass has finished, as
DistributedDataParallel's reducer does: the place for work that reads the filled ``.grad``
(Kolen-Pollack's decay) or must not change a tensor the backward still reads (a weight mirror).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: on_error(e) -> (gradient for the output, gradients for the anchors in order; None: none)
OnError = Callable[[Tensor], tuple[Tensor | None, Sequence[Tensor | None]]]


class _OutputTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, on_error: OnError, out: Tensor, *anchors: Tensor) -> Tensor:
        ctx.on_error = on_error
        # A marker the engine frees with the graph: after a backward without retain_graph it is gone,
        # and the tap drops what the rule kept of the forward (its block outputs) instead of holding
        # them for as long as the caller holds ``out`` (into the next step's forward, in most loops).
        ctx.save_for_backward(torch.empty(0, device=out.device))
        ctx.num_anchors = len(anchors)
        ctx.dtypes = [out.dtype, *(a.dtype for a in anchors)]  # each gradient goes back in its tensor's dtype
        # A view, not a copy: no memory for large outputs (a language model's (N, T, V) logits).
        return out.view_as(out)

    @staticmethod
    def backward(ctx, e: Tensor):
        # Grad mode is off in a backward; a rule's own losses formed here need their graphs.
        with torch.enable_grad():
            grad_out, grads = ctx.on_error(e)
        grads = list(grads)
        if len(grads) != ctx.num_anchors:
            raise RuntimeError(f"the tap has {ctx.num_anchors} anchors, its backward gave {len(grads)} gradients")
        grads = [g if g is None or g.dtype == dt else g.to(dt) for g, dt in zip([grad_out, *grads], ctx.dtypes)]
        after_backward(lambda: _release_if_freed(ctx))
        return (None, *grads)


def _release_if_freed(ctx) -> None:
    try:
        ctx.saved_tensors
    except RuntimeError:  # the graph was not retained: no further backward can reach this tap
        ctx.on_error = None


def tap(out: Tensor, on_error: OnError, anchors: Sequence[Tensor] = ()) -> Tensor:
    """``out``, with ``on_error`` run on ``dL/d out`` by any backward that reaches it (see the module doc).

    Anchors that need no gradient are left out (autograd would not take one). ``out`` itself may
    have no graph (a prediction formed without one): the output then needs grad through the anchors.
    """
    live = [a for a in anchors if a.requires_grad]
    keep = [i for i, a in enumerate(anchors) if a.requires_grad]
    if len(live) == len(anchors):
        return _OutputTap.apply(on_error, out, *live)

    def on_live(e: Tensor):
        grad_out, grads = on_error(e)
        grads = list(grads)
        return grad_out, [grads[i] for i in keep]

    return _OutputTap.apply(on_live, out, *live)


def after_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the current backward pass has finished (call it from inside a backward)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


__all__ = ["after_backward", "tap"]
