"""Rule: the contract every credit-assignment rule follows.

A rule wraps a model, may own extra tensors (feedback matrices, local modules), and exposes
every trainable tensor through ``parameters()`` so any ``torch.optim`` optimizer, scheduler or
``GradScaler`` works unchanged. It is used like autograd (docs/own-loop.md):

    out = rule(x)                  # the forward the update needs (cut blocks, a shared activation...)
    loss = any_loss(out, target)   # any scalar loss, any output shape
    loss.backward()                # or rule.backward(loss, scale=...): fills .grad as the rule prescribes

``rule.step(x, y)`` is the same path with the rule's default loss. Inference is the plain model:
``rule.model(x)``, or ``rule(x)`` in eval mode or under ``torch.no_grad()``.

The step is written once, as parts (see docs/design.md, "One owner for every update"):

- hooks: :meth:`Rule.before_step` (``B`` re-made from ``W``), :meth:`Rule.forward_context`
  (what feedback layers read in this forward: a shared activation), :meth:`Rule.after_backward`
  (on the filled ``.grad``: Kolen-Pollack's decay; after it: a mirror phase, a redraw);
- units (the rules without backward locking): :meth:`UnitRule.forward_units` runs a contiguous
  range of units on cut inputs, :meth:`UnitRule.unit_gradients` gives the gradient each of the
  range's tensors receives from its signal or local loss. The output tap (mechanisms/tap.py)
  runs all units as one range; a pipeline stage runs its own range with the same two calls, so a
  rule cannot behave differently in a stage.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ContextManager, NamedTuple

import torch
from torch import Tensor, nn

from ..mechanisms import (
    BoundaryCut,
    Segment,
    after_backward,
    block_output_shapes,
    downstream_product,
    get_loss,
    inject,
    run_cut,
    tap,
)
from ..mechanisms.modes import eval_mode


class StepResult(NamedTuple):
    loss: Tensor  # scalar, detached; read it with .item() outside the hot path
    logits: Tensor  # (N, C), detached


class OutputError(NamedTuple):
    """What the last unit sends every unit that waits for it: ``e = dL/d out`` and the output."""

    loss: Tensor | None  # scalar, detached; None when the caller's own loss made ``e``
    e: Tensor  # (N, ..., C): the output's shape
    logits: Tensor  # the output, detached


class UnitsRecord(NamedTuple):
    """What :meth:`Rule.forward_units` keeps of a batch until :meth:`Rule.backward_units`."""

    units: range
    y: Tensor | None  # (N,) class indices; None where the rule needs no target
    outputs: list[Any]  # per unit in ``units``: its output with graph (a block's h_i; an AL component's losses)
    logits: Tensor | None  # with graph, when ``units`` holds the last unit
    #: anything else the rule keeps (AL: the decoders' weights, to decode this batch later)
    extra: Any = None


#: why a rule with backward locking cannot be split over processes
BACKWARD_LOCKED = ("its layers are backward-locked: each waits for the error of the layer above, so a stage "
                   "could not update before every later stage had; use --parallel ddp")


#: per rule, its compiled forwards (``Rule.compile``): kept outside the rule, so a deep copy never
#: shares a compiled function bound to the original
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Forward:
    """What one training forward keeps for its backward(s): whether the rule's own terms (its own
    losses, target-driven signals, after-backward work) were applied yet, and the step's loss part."""

    __slots__ = ("own_done", "part")

    def __init__(self):
        self.own_done = False
        self.part: Tensor | None = None

    def take_own(self) -> bool:
        """True on the first backward through this forward: the rule's own terms go in once."""
        first, self.own_done = not self.own_done, True
        return first


class Rule(nn.Module):
    """Base rule: plain back-propagation through ``model``.

    Args:
        model: any ``nn.Module``; its output ``out`` may have any shape (N, ..., C) for the
            caller's own loss. Direct rules without ``blocks`` need an ``nn.Sequential`` whose last
            child is the head.
        num_classes: C, the size of the output's last axis (the output error ``e``).
        loss: the default loss of :meth:`step`: ``"cross-entropy"`` (softmax) or ``"mse"`` (on
            one-hot targets). Your own loop may use any loss (:meth:`backward`).
    """

    #: buffers the rule itself rewrites (sign-symmetric feedback tracks W); all others stay fixed
    mutable_buffers: tuple[str, ...] = ()
    #: the forward needs the class target: ``rule(x, y)`` (DRTP's signals, local classifiers, LTAS, AL)
    needs_target = False
    #: each backward adds a gradient linear in ``e = dL/d out``, plus the rule's own terms once per
    #: forward (times ``scale``, :meth:`backward`), so backward calls add up as autograd's do. False:
    #: DTP (its targets are non-linear in ``e``), brSF and WM (``B`` changes after the first backward)
    linear_in_loss = True

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy"):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        refusal = type(self).model_refusal(model)
        if refusal:
            raise ValueError(f"{type(self).__name__} {refusal}")
        self.model = model
        self.num_classes = num_classes
        self.loss = get_loss(loss)
        self._scale: float | Tensor = 1.0  # the caller's loss scale, inside backward() only

    # -- what the rule accepts ----------------------------------------------------------------

    @classmethod
    def model_refusal(cls, model: nn.Module) -> str | None:
        """Why this rule cannot train ``model`` (None: it can). ``rules.build`` raises it as one line.

        A folded (associated-learning) network is refused here; ``bp`` and ``al`` override it."""
        if getattr(model, "folded", False):
            return ("cannot train a folded (associated-learning) model; use rule 'al' (or 'bp' end to end), or "
                    "the matched BP model (mlp, vanilla-cnn, vgg, resnet20, resnet32)")
        return None

    @classmethod
    def pipeline_refusal(cls, rule: Rule | None = None) -> str | None:
        """Why this rule (class, or a built ``rule`` of it) cannot be split into pipeline stages; None:
        it can, at :meth:`UnitRule.pipeline_cuts`."""
        return BACKWARD_LOCKED

    # -- the optimizer's view -------------------------------------------------------------------

    # ``parameters()`` is nn.Module's own: every tensor, frozen ones too, so ``requires_grad_`` and
    # ``state_dict`` behave as on any module. It is safe to hand to an optimizer: a tensor the
    # rule must not have stepped (frozen, or trained by the rule itself) never gets a ``.grad``,
    # and torch.optim skips those. ``param_groups`` lists only what the optimizer steps.

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the caller's optimizer steps: tensors that need grad, less :meth:`self_trained`."""
        own = {id(p) for p in self.self_trained()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def self_trained(self) -> list[nn.Parameter]:
        """Tensors the rule updates itself inside ``step`` (LAS/LTAS ``update_first``), outside the optimizer."""
        return []

    def local_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors the rule owns beside the model (local modules, learned feedback)."""
        in_model = {id(p) for p in self.model.parameters()}
        return [p for p in self.trainable_parameters() if id(p) not in in_model]

    def param_groups(self, local_lr: float | None = None) -> list[dict]:
        """Optimizer groups: the model, then the rule's own tensors (with their own lr if given).

        ``torch.optim.Adam(rule.param_groups(local_lr=1e-3), lr=1e-4)``
        """
        in_local = {id(p) for p in self.local_parameters()}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in in_local]}]
        if in_local:
            groups.append({"params": self.local_parameters(), **({"lr": local_lr} if local_lr else {})})
        return groups

    def plain_model(self) -> nn.Module:
        """A copy of the trained network as plain PyTorch layers (``nn.Linear``, ``nn.Conv2d``, ``nn.ReLU``
        ...): its ``state_dict`` loads strictly into a freshly built model. The rule is untouched."""
        from ..mechanisms.feedback import plain_copy

        return plain_copy(self.inference_model())

    def compile(self, **options) -> None:
        """``torch.compile`` the forward the step runs (``options`` as torch.compile's): the model's
        forward for layer-wise rules, every unit's forward with the cuts between them for the others.
        The tap and the rule's own bookkeeping stay eager, so the compiled graph holds every feedback
        layer and every cut without a break (``fullgraph=True`` holds). A copy of the rule compiles
        its own on first use."""
        self._compile_options = dict(options)

    def _compiled(self, fn: Callable) -> Callable:
        """``fn`` (a method of this rule), compiled once per rule if :meth:`compile` was called."""
        options = getattr(self, "_compile_options", None)
        if options is None:
            return fn
        cache = _COMPILED.setdefault(self, {})
        if fn.__name__ not in cache:
            cache[fn.__name__] = torch.compile(fn, **options)
        return cache[fn.__name__]

    def _run_model(self, x: Tensor) -> Tensor:
        return self.model(x)

    def inference_model(self) -> nn.Module:
        """The network that predicts (``rule.model``; Associated Learning: its inference path)."""
        return self.model

    # -- diagnostics ------------------------------------------------------------------------------

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
        Used by ``creditflow.diagnostics.representations`` (class distances, t-SNE).
        """
        with eval_mode(self), torch.no_grad():
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

    # -- the PyTorch face: forward, any loss, backward ------------------------------------------

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        """Training (``rule.train()`` and grad enabled): the forward the update needs; any loss of its
        output and a backward through it train by the rule. Otherwise: the plain network's output.

        ``target`` (N,) class indices, for the rules that need it (``needs_target``)."""
        if not (self.training and torch.is_grad_enabled()):
            return self.inference_model()(x)
        return self.train_forward(x, target)[0]

    def backward(self, loss: Tensor, *, scale: float | Tensor = 1.0, retain_graph: bool | None = None) -> None:
        """``loss.backward()``, telling the rule the factor ``scale`` your loss carries beyond its plain
        value (a ``GradScaler``'s scale; ``1/n`` for ``n`` accumulated micro-batches).

        Gradients driven by ``e = dL/d out`` scale with the loss by themselves. What the rule adds
        once per forward from its own objectives (LAS/LTAS modules, local classifiers, DRTP's target
        signals, KP's decay, AL's and DTP's losses) is multiplied by ``scale``, so with
        ``rule.backward(scaler.scale(loss), scale=scaler.get_scale())`` every gradient carries the
        scale and ``scaler.unscale_`` / ``scaler.step`` are right. A plain ``loss.backward()`` is
        ``scale=1``."""
        self._scale = scale
        try:
            torch.autograd.backward(loss, retain_graph=retain_graph)
        finally:
            self._scale = 1.0

    def _check_target(self, target: Tensor | None) -> None:
        if self.needs_target and target is None:
            raise ValueError(f"{type(self).__name__} needs the class target in its forward: out = rule(x, y)")
        if target is not None and (target.dtype not in (torch.int64, torch.int32) or target.ndim != 1):
            raise ValueError(f"the target must be class indices of shape (N,), got {target.dtype} "
                             f"{tuple(target.shape)}")

    # -- the step, as parts ---------------------------------------------------------------------

    def before_step(self) -> None:
        """Before the forward: feedback re-made from the current weights (AS, sign symmetry)."""

    def forward_context(self, x: Tensor) -> ContextManager:
        """Entered around the forward of ``x`` (the first input of the units that run): what this
        step's feedback layers read (a shared activation; a random forward path's activation)."""
        return contextlib.nullcontext()

    def after_backward(self, scale: float | Tensor) -> None:
        """Once per forward, when its first backward has filled ``.grad`` (before the optimizer):
        KP's decay (times ``scale``, as a term of the loss); a mirror phase; a redraw."""

    def _has_after_backward(self) -> bool:
        return type(self).after_backward is not Rule.after_backward

    def train_forward(self, x: Tensor, target: Tensor | None = None) -> tuple[Tensor, _Forward]:
        """The training forward: the output (tapped where the rule acts in the backward) and its state."""
        self._check_target(target)
        self.before_step()
        with self.forward_context(x):
            out = self._compiled(self._run_model)(x)
        state = _Forward()
        if not self._has_after_backward():
            return out, state  # plain autograd is the whole rule (BP, FA, AS, FoA...)

        def on_error(e: Tensor):
            if state.take_own():
                scale = self._scale
                after_backward(lambda: self.after_backward(scale))
            return e, []

        return tap(out, on_error), state

    def step(self, x: Tensor, y: Tensor, *, scale: float | Tensor = 1.0) -> StepResult:
        """One training step's gradients with the default loss: ``rule(x, y)``, the loss, backward.

        ``scale``: the loss scale of fp16 training (a ``GradScaler``'s): every gradient is multiplied
        by it; ``StepResult.loss`` is the plain loss."""
        out, _ = self.train_forward(x, y)
        loss = self.loss.value(out, y)
        self.backward(loss if _is_one(scale) else loss * scale, scale=scale)
        return StepResult(loss.detach(), out.detach())


def placement(model: nn.Module) -> dict:
    """``device``/``dtype`` of the model's parameters, for tensors a rule creates beside it."""
    p = next(model.parameters(), None)
    return {"device": p.device, "dtype": p.dtype} if p is not None else {}


class UnitRule(Rule):
    """A rule without backward locking: its network is a chain of units, each trained from what
    it gets at its own boundary. Subclasses give the units' forward and the gradients they receive.

    The training forward runs the whole chain as one range behind the output tap; a pipeline stage
    (:mod:`creditflow.parallel.stages`) runs its own range with the same calls.
    """

    #: False where no unit learns from the output error (AL: every component has its own losses)
    uses_output_error = True
    #: True where hidden units update from this batch's output error, so they wait for it (DFA,
    #: LAS); False where they need only their own output and the target (DRTP, local classifiers)
    hidden_waits_for_error = True
    #: True where the prediction is formed on the way back down the units (AL's decoders)
    prediction_runs_down = False

    @classmethod
    def pipeline_refusal(cls, rule: Rule | None = None) -> str | None:
        return None

    def num_units(self) -> int:
        raise NotImplementedError

    def unit_modules(self, i: int) -> list[nn.Module]:
        """The modules whose tensors unit ``i`` trains and keeps (a pipeline stage owns its units')."""
        raise NotImplementedError

    def unit_name(self, i: int) -> str:
        return f"unit {i}"

    def pipeline_cuts(self) -> set[int]:
        """Unit boundaries where a stage may end (``i``: between unit i-1 and unit i)."""
        return set(range(1, self.num_units()))

    def first_inputs(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
        return (x,)

    def forward_units(self, units: range, inputs: Sequence[Tensor], y: Tensor | None
                      ) -> tuple[UnitsRecord, tuple[Tensor, ...]]:
        """Run ``units`` on ``inputs`` (cut from the graph); return the record and what the next unit reads."""
        raise NotImplementedError

    def waits_for_error(self, units: range) -> bool:
        """Do these units need this batch's :class:`OutputError` before they can update?"""
        return self.hidden_waits_for_error and units.start < self.num_units() - 1

    def output_error(self, record: UnitsRecord) -> OutputError | None:
        """On the range holding the last unit, with the default loss: the loss and ``e`` (closed form)."""
        if record.logits is None or not self.uses_output_error:
            return None
        loss, e = self.loss.error(record.logits, record.y)  # e = dL/dlogits: (N, C), no graph
        return OutputError(loss, e, record.logits.detach())

    def unit_gradients(self, record: UnitsRecord, error: OutputError | None, own: bool = True,
                       scale: float | Tensor = 1.0) -> tuple[list[tuple[Tensor, Tensor | None]], Tensor | None]:
        """``([(tensor, its gradient)], loss part)`` for the range: what one backward gives each tensor.

        ``error``: the output error (None where no unit of the range uses it). ``own``: add the
        rule's own terms (its losses, target-driven signals), which go in once per forward, times
        ``scale`` (see :meth:`Rule.backward`). The loss part is the range's share of
        ``StepResult.loss`` where the rule has no output loss (AL), else None."""
        raise NotImplementedError

    def backward_units(self, record: UnitsRecord, error: OutputError | None) -> Tensor | None:
        """Fill ``.grad`` of the range's tensors in one backward; return the range's loss part."""
        pairs, part = self.unit_gradients(record, error)
        if pairs:
            inject([t for t, _ in pairs], [g for _, g in pairs])
        return part

    def anchors(self, record: UnitsRecord) -> list[Tensor]:
        """Tensors of the forward that receive their gradients in the caller's backward pass (the
        tap's anchors): the hidden outputs ``h_i`` by default."""
        return [o for o in record.outputs if isinstance(o, Tensor)]

    def prediction(self, record: UnitsRecord, error: OutputError | None) -> Tensor | None:
        """The step's output, detached, on the range holding the last unit."""
        return error.logits if error is not None else None

    def decode_units(self, record: UnitsRecord, t: Tensor) -> Tensor:
        """``prediction_runs_down`` rules: carry the prediction down through the range's units."""
        raise NotImplementedError

    def train_forward(self, x: Tensor, target: Tensor | None = None) -> tuple[Tensor, _Forward]:
        self._check_target(target)
        self.before_step()
        units = range(self.num_units())
        with self.forward_context(x):
            record, _ = self._compiled(self.forward_units)(units, self.first_inputs(x, target), target)
        state = _Forward()
        out = record.logits if record.logits is not None else self.prediction(record, None)
        anchors = self.anchors(record)

        def on_error(e: Tensor):
            own = state.take_own()
            scale = self._scale
            error = OutputError(None, e, out.detach()) if self.uses_output_error else None
            pairs, part = self.unit_gradients(record, error, own, scale)
            if own:
                state.part = part
                if self._has_after_backward():
                    after_backward(lambda: self.after_backward(scale))
            grads = {id(t): g for t, g in pairs}
            grad_out = grads.pop(id(record.logits), None) if record.logits is not None else None
            anchor_grads = [grads.pop(id(a), None) for a in anchors]
            # made in this backward (a local loss on detached outputs): a graph of its own
            rest = [(t, g) for t, g in pairs if id(t) in grads]
            if rest:
                inject([t for t, _ in rest], [g for _, g in rest])
            return grad_out, anchor_grads

        return tap(out, on_error, anchors), state

    def step(self, x: Tensor, y: Tensor, *, scale: float | Tensor = 1.0) -> StepResult:
        out, state = self.train_forward(x, y)
        self._scale = scale
        try:
            if self.uses_output_error:
                loss, e = self.loss.error(out, y)  # the closed form: no second graph for the default loss
                torch.autograd.backward(out, e if _is_one(scale) else e * scale)
            else:  # no output loss (AL): the backward reaches the tap for the rule's own losses
                torch.autograd.backward(out, torch.zeros_like(out))
                loss = state.part
        finally:
            self._scale = 1.0
        return StepResult(loss, out.detach())


def child_spans(model: nn.Module, names: Sequence[str] | str) -> list[nn.Module] | None:
    """``model``'s children grouped into spans ending at the named children (the rest, head last, one
    span), each span an ``nn.Sequential`` of the model's own modules (or the child itself); None when
    ``model`` is not an ``nn.Sequential`` or a name is not one of its children."""
    names = [names] if isinstance(names, str) else list(names)
    children = list(model.named_children()) if isinstance(model, nn.Sequential) else []
    index = {n: i for i, (n, _) in enumerate(children)}
    if not names or not all(isinstance(n, str) and n in index for n in names):
        return None
    ends = [index[n] for n in names]
    if ends != sorted(set(ends)) or ends[-1] == len(children) - 1:
        raise ValueError(f"blocks must name children in forward order, the head after the last, got {names}; "
                         f"children: {', '.join(n for n, _ in children)}")
    modules = [m for _, m in children]
    starts = [0] + [e + 1 for e in ends]
    stops = [e + 1 for e in ends] + [len(modules)]
    spans = [modules[a:b] for a, b in zip(starts, stops)]
    return [span[0] if len(span) == 1 else nn.Sequential(*span) for span in spans]


class DirectRule(UnitRule):
    """Direct credit paths: blocks are cut apart and each hidden block gets a signal at its output.

    The last ``top_blocks`` blocks (1: the head alone) form the top, trained with the true
    gradient of the loss; every block below it receives ``signals(e, y, outputs, blocks)[i]`` and
    back-propagates it inside itself only. Subclasses say only how signals are made.

    Units: each hidden block, then the top. Blocks: an ``nn.Sequential``'s children (the last one
    the head), or ``blocks=["stem", "layer1", ...]``: the names of the modules whose *outputs* end a
    block, the head everything after the last name. Names of an ``nn.Sequential``'s own children
    group them into spans (a span is cut at its input and gets one signal at its output; it runs
    and pipelines like a child). Names of deeper modules, in any model, cut the model's own forward
    by forward hooks at those outputs (:class:`~creditflow.mechanisms.BoundaryCut`); such a rule runs
    in one process only (its forward cannot be split).
    """

    top_blocks = 1
    #: the rule's own ModuleLists with one entry per hidden block (LAS's local modules): unit i owns entry i
    per_block_modules: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy",
                 input_shape: tuple[int, ...] | None = None, blocks: Sequence[str] | None = None):
        super().__init__(model, num_classes, loss)
        self._cut: BoundaryCut | None = None
        spans = child_spans(model, blocks) if blocks is not None else None
        if blocks is not None and spans is None:
            self._init_named_blocks(model, blocks, input_shape)
            return
        if not isinstance(model, nn.Sequential):
            children = ", ".join(n for n, _ in model.named_children()) or "none"
            raise ValueError(f"{type(self).__name__} cuts a {type(model).__name__} (not an nn.Sequential) only at "
                             f"named modules: pass blocks=[names whose outputs end a block]; children: {children}")
        blocks = spans or list(model.children())
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
        self._output_shape = probe.output_shape
        # Plain tuples, not submodules: the model owns the parameters; a Segment only lists them.
        self._hidden = tuple(Segment(n, model, ps) for n, ps in zip(names[:split], probe.parameters))
        self._top = None  # the model's own forward after the last cut

    # -- units ----------------------------------------------------------------------------------

    @classmethod
    def pipeline_refusal(cls, rule: Rule | None = None) -> str | None:
        if rule is not None and rule._cut is not None:
            return ("it was built with blocks=[names]: it runs the model's own forward, which cannot be cut "
                    "across processes; use an nn.Sequential of blocks")
        return None

    def num_units(self) -> int:
        return len(self._hidden) + 1

    def unit_name(self, i: int) -> str:
        return "top" if i == len(self._hidden) else f"block {i}"

    def unit_modules(self, i: int) -> list[nn.Module]:
        """The modules unit ``i`` trains: its block and its entry of each per-block part (the top: its blocks)."""
        if i < len(self._hidden):
            return [self._hidden[i], *(getattr(self, name)[i] for name in self.per_block_modules)]
        return list(self._top) if isinstance(self._top, nn.Sequential) else [self._top]

    def hidden_output_shapes(self) -> list[torch.Size]:
        if self._cut is not None:
            return list(self._cut_shapes)
        return block_output_shapes(self._hidden, self.input_shape)

    def output_positions(self) -> tuple[int, ...]:
        """The position axes ``P`` of the model's output (N, *P, C): () for one vector per sample,
        (T,) for a sequence (a language model's (N, T, V)), read from a probe forward."""
        if self._cut is not None:
            shape = self._output_shape
        else:
            tops = list(self._top) if isinstance(self._top, nn.Sequential) else [self._top]
            shape = block_output_shapes([*self._hidden, *tops], self.input_shape)[-1]
        return tuple(shape[:-1])

    def feedback_shapes(self) -> list[torch.Size]:
        """Per hidden block, the shape a direct feedback matrix maps ``e``'s last axis to: the block's
        output shape, less the output's position axes (a token block (T, D) under a (T, C) output:
        (D,), the same ``B_i`` at every position; an image block under an (N, C) output: (C, H, W))."""
        positions, shapes = self.output_positions(), self.hidden_output_shapes()
        if not positions:
            return shapes
        for i, s in enumerate(shapes):
            if tuple(s[:len(positions)]) != positions:
                raise ValueError(f"block {i} outputs {tuple(s)} per sample, which does not start with the model "
                                 f"output's positions {positions}: a per-position feedback needs token blocks")
        return [s[len(positions):] for s in shapes]

    def require_flat_output(self) -> None:
        """One line for a rule whose signals need one output vector per sample (N, C)."""
        if positions := self.output_positions():
            raise ValueError(f"{type(self).__name__} needs one output vector per sample (N, C); this model outputs "
                             f"(N, {', '.join(map(str, positions))}, C): dfa and shallow take outputs with positions")

    def forward_units(self, units, inputs, y):
        (h,) = inputs
        blocks = range(units.start, min(units.stop, len(self._hidden)))
        if self._cut is not None:
            if units != range(self.num_units()):
                raise ValueError(self.pipeline_refusal(self))
            logits, outputs = self._cut(h)  # the model's own forward, cut by hooks at the named outputs
            return UnitsRecord(units, y, outputs, logits), ()
        outputs = run_cut([self._hidden[i] for i in blocks], h)  # h_i, each block's input detached
        if units.stop <= len(self._hidden):
            return UnitsRecord(units, y, outputs, None), (outputs[-1].detach(),)
        logits = self._top(outputs[-1].detach() if outputs else h.detach())
        return UnitsRecord(units, y, outputs, logits), ()

    def unit_gradients(self, record, error, own=True, scale=1.0):
        blocks = range(record.units.start, record.units.start + len(record.outputs))
        y, outputs = record.y, record.outputs
        e = error.e if error is not None else None
        logits = error.logits if error is not None else None
        if e is None and outputs:  # rules whose signals need no output may still read e's shape and dtype
            e = torch.zeros((), dtype=outputs[0].dtype, device=outputs[0].device).expand(len(outputs[0]),
                                                                                           self.num_classes)
        target_driven = not self.hidden_waits_for_error  # DRTP, local classifiers: the rule's own term
        # Under autocast the blocks ran in bfloat16/float16: signals and local losses are formed in
        # the rule's own precision (float32 feedback, e ~ 1/N would underflow in half precision),
        # each signal then handed to its block in the block's dtype.
        dtype = self.feedback_dtype()
        views = [h if h.dtype == dtype else h.detach().to(dtype) for h in outputs]
        e = e.to(dtype) if e is not None else None
        logits = logits.to(dtype) if logits is not None else None
        if own:
            self.before_signals(views, logits, y, blocks)
        signals: list[Tensor | None] = [None] * len(outputs)
        if outputs and (own or not target_driven):
            with torch.no_grad():
                signals = self.signals(e, y, views, blocks)
            if target_driven and not _is_one(scale):
                signals = [s * scale if s is not None else None for s in signals]
            signals = [s.to(h.dtype) if s is not None else None for s, h in zip(signals, outputs)]
        local = self.local_loss(views, logits, y, blocks) if own and outputs else None
        pairs = list(zip(outputs, signals))
        if record.logits is not None and error is not None:
            pairs.insert(0, (record.logits, error.e))  # the top learns from e, as in BP (its own dtype)
        if local is not None:  # the rule-owned modules' loss, on detached outputs
            pairs.append((local, torch.ones_like(local) if _is_one(scale) else torch.ones_like(local) * scale))
        return pairs, None

    def feedback_dtype(self) -> torch.dtype:
        """The precision of signals and local losses: the model's parameters' (float32 under autocast)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.get_default_dtype())

    # -- what subclasses say ----------------------------------------------------------------------

    def signals(self, e: Tensor, target: Tensor, outputs: list[Tensor], blocks: range) -> list[Tensor | None]:
        """One signal per output of hidden blocks ``blocks`` (``outputs[j]`` is block ``blocks[j]``'s
        ``h``), each the shape of its output, or None for no update."""
        raise NotImplementedError

    def local_loss(self, outputs: list[Tensor], logits: Tensor | None, target: Tensor, blocks: range) -> Tensor | None:
        """A loss on rule-owned modules fed with the detached outputs of ``blocks`` (LAS/LTAS), or None."""
        return None

    def before_signals(self, outputs: list[Tensor], logits: Tensor | None, target: Tensor, blocks: range) -> None:
        """Before the signals are formed (LAS/LTAS ``update_first``: the modules take their own step)."""

    # -- diagnostics ------------------------------------------------------------------------------

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


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1


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
