"""Rule: the contract every credit-assignment rule follows.

A rule wraps a model, may own extra tensors (feedback matrices, local modules), and exposes
every trainable tensor through ``parameters()`` so any ``torch.optim`` optimizer, scheduler,
AMP or DDP works unchanged. ``step(x, y)`` runs the forward pass and fills ``.grad``; the
caller steps the optimizer. Inference is the plain model: ``rule.model(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..mechanisms import (BoundaryCut, Segment, block_output_shapes, downstream_product, get_loss, inject,
                          run_cut)


class StepResult(NamedTuple):
    loss: Tensor  # scalar, detached; read it with .item() outside the hot path
    logits: Tensor  # (N, C), detached


class Rule(nn.Module):
    """Base rule: plain back-propagation through ``model``.

    Args:
        model: any ``nn.Module`` that returns the logits (N, C); a ``BlockNet`` or an
            ``nn.Sequential`` whose last child is the head for direct rules without ``blocks``.
        num_classes: C, the size of the output error ``e``.
        loss: ``"cross-entropy"`` (softmax) or ``"mse"`` (on one-hot targets).
    """

    #: a rule that can update blocks before the output exists (DRTP, LTAS) sets this
    needs_target_early = False
    #: buffers the rule itself rewrites (sign-symmetric feedback tracks W); all others stay fixed
    mutable_buffers: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy"):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.model = model
        self.num_classes = num_classes
        self.loss_name = loss
        self.loss = get_loss(loss)

    def parameters(self, recurse: bool = True):
        """Every tensor this rule trains: model and rule-owned, frozen ones left out."""
        return (p for p in super().parameters(recurse) if p.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def local_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors the rule owns beside the model (local modules, learned feedback)."""
        in_model = {id(p) for p in self.model.parameters()}
        return [p for p in self.parameters() if id(p) not in in_model]

    def param_groups(self, local_lr: float | None = None) -> list[dict]:
        """Optimizer groups: the model, then the rule's own tensors (with their own lr if given).

        ``torch.optim.Adam(rule.param_groups(local_lr=1e-3), lr=1e-4)``
        """
        in_local = {id(p) for p in self.local_parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in in_local]}]
        if in_local:
            groups.append({"params": self.local_parameters(), **({"lr": local_lr} if local_lr else {})})
        return groups

    def feedback_pairs(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (B, reference)}`` for every feedback matrix this rule uses in place of BP's.

        ``reference`` is what ``B`` replaces, in the same layout (``W`` for a feedback layer, the
        downstream product for a direct rule), so the angle between the two measures weight
        alignment. Rules with no such matrix return ``{}``.
        """
        return {}

    def step_metrics(self) -> dict[str, Tensor]:
        """Scalars of the last ``step`` beside the loss (detached tensors, no ``.item()`` here).

        The trainer averages them over an epoch and writes them to ``metrics.jsonl``; e.g. the
        associated loss of every component (AL). Rules with nothing to report return ``{}``.
        """
        return {}

    def representations(self, x: Tensor) -> dict[str, Tensor]:
        """``{layer: (N, ...) features}`` of ``x`` in forward order, for the analyses of a trained rule.

        Computed without grad in eval mode (every module's mode is restored afterwards). Default:
        for an ``nn.Sequential`` model, the output of each child (block): ``block0 .. block{k-1}``,
        then ``head`` (the logits); children with names of their own keep them. A model with its
        own ``representations(x)`` method is asked instead; any other model gives ``{"output": logits}``.
        A rule whose features live elsewhere (Associated Learning's metafeatures) overrides this.
        Used by ``creditflow.diagnostics.representations`` (class distances, t-SNE).
        """
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                if callable(getattr(self.model, "representations", None)):
                    return self.model.representations(x)
                children = list(self.model.named_children())
                if not isinstance(self.model, nn.Sequential) or not children:
                    return {"output": self.model(x)}  # children of other modules need not run in order
                out, h = {}, x
                for i, (name, child) in enumerate(children):
                    h = child(h)
                    if name.isdigit():  # nn.Sequential's own names "0", "1", ...
                        name = "head" if i == len(children) - 1 else f"block{i}"
                    out[name] = h
                return out
        finally:
            for m, mode in modes:
                m.training = mode

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        logits = self.model(x)
        loss = self.loss.value(logits, y)
        loss.backward()
        return StepResult(loss.detach(), logits.detach())


def placement(model: nn.Module) -> dict:
    """``device``/``dtype`` of the model's parameters, for tensors a rule creates beside it."""
    p = next(model.parameters(), None)
    return {"device": p.device, "dtype": p.dtype} if p is not None else {}


class DirectRule(Rule):
    """Direct credit paths: blocks are cut apart and each hidden block gets a signal at its output.

    The last ``top_blocks`` blocks (1: the head alone) form the top, trained with the true
    gradient of the loss; every block below it receives ``signals(e, y, outputs)[i]`` and
    back-propagates it inside itself only. Subclasses say only how signals are made.

    Blocks: an ``nn.Sequential``'s children (the last one the head), or, for any model,
    ``blocks=["stem", "layer1", ...]``: the names of the modules whose *outputs* end a block. The
    model's own forward then runs unchanged, cut by forward hooks at those outputs
    (:class:`~creditflow.mechanisms.BoundaryCut`); the head is everything after the last name.
    """

    top_blocks = 1
    #: False where hidden blocks' signals and local losses use only the target, not this batch's
    #: output (DRTP, local classifiers): a pipeline stage then updates right after its own forward
    signals_need_output = True

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 input_shape: tuple[int, ...] | None = None, blocks: Sequence[str] | None = None):
        super().__init__(model, num_classes, loss)
        self._cut: BoundaryCut | None = None
        if blocks is not None:
            self._init_named_blocks(model, blocks, input_shape)
            return
        if not isinstance(model, nn.Sequential):
            children = ", ".join(n for n, _ in model.named_children()) or "none"
            raise ValueError(f"{type(self).__name__} cuts a {type(model).__name__} (not an nn.Sequential) only at "
                             f"named modules: pass blocks=[names whose outputs end a block]; children: {children}")
        blocks = list(model.children())
        if len(blocks) < 2:
            raise ValueError(f"{type(self).__name__} needs a model of at least 2 blocks (hidden + head), "
                             f"got {len(blocks)}; wrap layers in an nn.Sequential of blocks")
        split = max(len(blocks) - self.top_blocks, 0)
        # Plain tuples, not submodules: the model already owns these modules.
        self._hidden = tuple(blocks[:split])
        self._top = nn.Sequential(*blocks[split:]) if split < len(blocks) - 1 else blocks[-1]
        self.input_shape = resolve_input_shape(model, input_shape)

    def _init_named_blocks(self, model: nn.Module, blocks: Sequence[str], input_shape) -> None:
        names = [blocks] if isinstance(blocks, str) else list(blocks)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"blocks must be a non-empty list of module names, got {blocks!r}")
        self.input_shape = resolve_input_shape(model, input_shape)
        probe = BoundaryCut(model, names).probe(self.input_shape)  # checks every name, in order
        split = max(len(names) + 1 - self.top_blocks, 0)  # k names make k + 1 blocks, the head last
        self._cut = BoundaryCut(model, names[:split])
        self._cut_shapes = probe.shapes[:split]
        # Plain tuples, not submodules: the model owns the parameters; a Segment only lists them.
        self._hidden = tuple(Segment(n, model, ps) for n, ps in zip(names[:split], probe.parameters))
        self._top = None  # the model's own forward after the last cut

    def hidden_output_shapes(self) -> list[torch.Size]:
        if self._cut is not None:
            return list(self._cut_shapes)
        return block_output_shapes(self._hidden, self.input_shape)

    def feedback_matrices(self) -> list[Tensor]:
        """The (C, n_i) matrix each hidden block's signal is made with, if the rule has one."""
        return []

    def feedback_pairs(self):
        """Each block's feedback matrix beside the downstream product it stands in for (MLPs)."""
        matrices = self.feedback_matrices()
        if not matrices:
            return {}
        try:
            products = self.downstream_products()
        except ValueError:  # conv blocks: no matrix to compare with
            return {}
        return {f"block{i}": pair for i, pair in enumerate(zip(matrices, products))}

    def downstream_products(self) -> list[Tensor]:
        """For hidden block i, ``W_L ... W_{i+1}`` over every block after it (MLPs only)."""
        if self._cut is not None:
            raise ValueError("feedback_init='product' needs an nn.Sequential of fully connected blocks; "
                             "with blocks=[...] use feedback_init='random'")
        blocks = list(self.model.children())
        return [downstream_product(blocks[i + 1:]) for i in range(len(self._hidden))]

    def signals(self, e: Tensor, target: Tensor, outputs: list[Tensor]) -> list[Tensor | None]:
        """One signal per hidden block output (shape of ``outputs[i]``), or None for no update."""
        raise NotImplementedError

    def local_loss(self, outputs: list[Tensor], logits: Tensor, target: Tensor) -> Tensor | None:
        """A loss on rule-owned modules fed with detached block outputs (LAS/LTAS), or None."""
        return None

    def forward_cut(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(logits, [h_1 .. h_k])``: one forward with every hidden block's input detached."""
        if self._cut is not None:
            return self._cut(x)  # the model's own forward, cut by hooks at the named outputs
        outputs = run_cut(self._hidden, x)
        return self._top(outputs[-1].detach() if outputs else x), outputs

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        logits, outputs = self.forward_cut(x)  # h_1 .. h_k, each block's input detached
        loss, e = self.loss.error(logits, y)  # e = dL/dlogits: (N, C), no graph
        with torch.no_grad():
            signals = self.signals(e, y, outputs)
        local = self.local_loss(outputs, logits, y)
        extra = [(local, torch.ones_like(local))] if local is not None else []
        # One backward: the model's blocks from their signals, local modules from their own loss.
        inject([logits, *outputs, *(t for t, _ in extra)], [e, *signals, *(g for _, g in extra)])
        return StepResult(loss, logits.detach())


def resolve_input_shape(model: nn.Module, input_shape) -> tuple[int, ...]:
    """``input_shape`` given, else the model's, else inferred from a leading Linear layer."""
    if input_shape is not None:
        return tuple(int(d) for d in input_shape)
    if getattr(model, "input_shape", None) is not None:
        return tuple(model.input_shape)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise ValueError("cannot infer the input shape of this model; pass input_shape=(C, H, W)")
