"""Pipeline stages: a rule's blocks (or AL components) cut into contiguous groups, one per process.

A *unit* is the smallest piece a stage can hold: for a direct rule (DFA, DRTP, LAS, LTAS, local
classifiers, Shallow) each hidden block, then the top (the last ``top_blocks`` blocks, which learn
from the true output gradient) as one unit; for Associated Learning each component. Units are split
into S contiguous stages by :func:`partition`, balanced on a per-unit cost (parameter count, or
measured forward + backward time).

Every process builds the *whole* rule from the same seed (so every stage starts from the weights
the single-process trainer would have), then keeps a :class:`Stage` over its own units:

- :class:`DirectStage`: its hidden blocks (run with cut inputs, as ``DirectRule.step``), the top
  on the last stage, and a *restricted view* of the rule whose per-block parts (the ``B_i`` columns
  of a :class:`~creditflow.mechanisms.DirectFeedback`, the entries of a per-block ``ModuleList``
  such as LAS's local modules or the local classifiers) are this stage's only, so
  ``view.signals(e, y, outputs)`` and ``view.local_loss`` are the rule's own code on the stage's
  blocks.
- :class:`ALStage`: its components; ``Component.forward`` already cuts its inputs.

The stage trains the tensors it owns with its own optimizer over ``rule.param_groups`` restricted
to them; :meth:`Stage.owned_state` names them as in the whole rule's ``state_dict``, so rank 0 can
gather one checkpoint that loads into the single-process rule.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ..mechanisms import DirectFeedback, inject, run_cut
from ..rules.associated_learning import AL
from ..rules.base import DirectRule, Rule

BALANCES = ("params", "time")


def pipeline_units(rule: Rule) -> list[list[nn.Module]]:
    """The modules of each unit, in forward order (see the module docstring)."""
    if isinstance(rule, AL):
        return [[c] for c in rule.model.components]
    if isinstance(rule, DirectRule):
        if getattr(rule, "_cut", None) is not None:
            raise ValueError("the pipeline splits nn.Sequential models only; a rule built with blocks=[names] "
                             "runs the model's own forward, which cannot be cut across processes")
        blocks = list(rule.model.children())
        split = len(rule._hidden)
        return [[b] for b in blocks[:split]] + [blocks[split:]]
    raise ValueError(f"rule {type(rule).__name__} cannot be pipelined: it has backward locking (every layer waits for "
                     "the layers above); the pipeline runs direct rules (dfa, drtp, las, ltas, local, shallow) and al; "
                     "use --parallel ddp for the others")


def partition(costs: Sequence[float], stages: int) -> list[range]:
    """Contiguous split of units into ``stages`` non-empty groups minimising the largest group cost.

    Exact dynamic programme (O(S n^2), n units); ties keep earlier groups small.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} pipeline units into {stages} stages; use --stages 1..{n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[s][i]: first i units in s stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i] - 1e-12 * max(1.0, abs(v)):
                    best[s][i], cut[s][i] = v, j
    bounds, i = [n], n
    for s in range(stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    bounds.reverse()
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def unit_costs(rule: Rule, balance: str, batch_size: int = 64, repeats: int = 3,
               device: torch.device | str | None = None) -> list[float]:
    """Per-unit cost: ``"params"`` (trainable parameter count, with the rule's per-block modules) or
    ``"time"`` (median forward + backward seconds on a zero batch of ``batch_size``, on a copy of the
    rule on ``device`` if given)."""
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; available: {', '.join(BALANCES)}")
    units = pipeline_units(rule)
    if balance == "params":
        def count(mods):
            return float(sum(p.numel() for m in mods for p in m.parameters() if p.requires_grad))
        costs = [count(unit) for unit in units]
        for mods in per_block_modules(rule):  # LAS's local modules, learned local classifiers
            for i, m in enumerate(mods):
                costs[i] += count([m])
        return costs
    if device is not None and torch.device(device) != next(rule.model.parameters()).device:
        rule = copy.deepcopy(rule).to(device)
        units = pipeline_units(rule)
    return _timed_costs(rule, units, batch_size, repeats)


def per_block_modules(rule: Rule) -> list[nn.ModuleList]:
    if not isinstance(rule, DirectRule):
        return []
    k = len(rule._hidden)
    return [m for name, m in rule.named_children()
            if isinstance(m, nn.ModuleList) and len(m) == k and name not in ("model", "_top")]


def _timed_costs(rule: Rule, units, batch_size: int, repeats: int) -> list[float]:
    p = next(rule.model.parameters())
    inputs = probe_inputs(rule, batch_size)
    costs = []
    for i, unit in enumerate(units):
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            if isinstance(rule, AL):
                s, t = inputs[i]
                out = unit[0](s, t, rule.reduction)
                (out.assoc_loss + out.ae_loss).backward()
            else:
                h = inputs[i][0]
                for m in unit:
                    h = m(h.detach() if h is inputs[i][0] else h)
                h.backward(torch.randn_like(h))
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)
            times.append(time.perf_counter() - start)
        rule.zero_grad(set_to_none=True)
        costs.append(sorted(times[1:])[len(times[1:]) // 2])
    return costs


@torch.no_grad()
def probe_inputs(rule: Rule, batch: int = 2) -> list[tuple[Tensor, ...]]:
    """The input tensors of every unit for a zero batch (eval mode; modes restored): shapes and dtypes."""
    p = next(rule.model.parameters())
    modes = [(m, m.training) for m in rule.modules()]
    rule.eval()
    try:
        if isinstance(rule, AL):
            s = torch.zeros(batch, *rule.model.input_shape, device=p.device, dtype=p.dtype)
            t = torch.zeros(batch, rule.num_classes, device=p.device, dtype=p.dtype)
            out = []
            for c in rule.model.components:
                out.append((s, t))
                o = c(s, t, rule.reduction)
                s, t = o.s, o.t
            return out
        h = torch.zeros(batch, *rule.input_shape, device=p.device, dtype=p.dtype)
        out = []
        for unit in pipeline_units(rule):
            out.append((h,))
            for m in unit:
                h = m(h)
        return out
    finally:
        for m, mode in modes:
            m.training = mode


class Plan(NamedTuple):
    """Which units each stage holds, and what crosses each boundary."""

    stages: list[range]  # unit indices per stage
    costs: list[float]  # per unit
    balance: str
    #: per stage s > 0: per-sample shape of each tensor stage s receives (h; or s and t for AL)
    inputs: list[list[tuple[int, ...]]]

    def describe(self, rule: Rule) -> list[str]:
        kind = "component" if isinstance(rule, AL) else "block"
        n = len(self.costs)
        lines = []
        for s, r in enumerate(self.stages):
            names = [f"{kind} {i}" if isinstance(rule, AL) or i < n - 1 else "top" for i in r]
            lines.append(f"stage {s}: {', '.join(names)} (cost {sum(self.costs[i] for i in r):.3g} {self.balance})")
        return lines


def make_plan(rule: Rule, stages: int, balance: str = "params", batch_size: int = 64,
              device: torch.device | str | None = None) -> Plan:
    """Split ``rule`` into ``stages`` (see :func:`unit_costs` for ``balance``)."""
    costs = unit_costs(rule, balance, batch_size, device=device)
    parts = partition(costs, stages)
    probes = probe_inputs(rule)
    inputs = [[tuple(t.shape[1:]) for t in probes[r.start]] for r in parts]
    return Plan(parts, costs, balance, inputs)


# --- stages ------------------------------------------------------------------------------------

def restrict(rule: DirectRule, keep: range) -> DirectRule:
    """A shallow copy of ``rule`` whose hidden blocks and per-block parts are ``keep`` only.

    Per-block parts are found by structure, never by rule name: a ``DirectFeedback`` (its ``B_i``
    columns are narrowed to the kept blocks', a view) and every child ``ModuleList`` with one entry
    per hidden block. A rule with any other trainable child cannot be split and raises.
    """
    k = len(rule._hidden)
    view = copy.copy(rule)
    view._modules, view._parameters, view._buffers = dict(rule._modules), dict(rule._parameters), dict(rule._buffers)
    view._hidden = tuple(rule._hidden[i] for i in keep)
    for name, m in rule._modules.items():
        if name in ("model", "_top") or m is None:
            continue
        if isinstance(m, DirectFeedback):
            view._modules[name] = _narrow_feedback(m, keep)
        elif isinstance(m, nn.ModuleList) and len(m) == k:
            view._modules[name] = nn.ModuleList([m[i] for i in keep])
        elif any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            raise ValueError(f"cannot split rule {type(rule).__name__} into pipeline stages: its module {name!r} "
                             "is not per block (a DirectFeedback or a ModuleList with one entry per hidden block)")
    return view


def _narrow_feedback(fb: DirectFeedback, keep: range) -> DirectFeedback:
    part = object.__new__(DirectFeedback)
    nn.Module.__init__(part)
    part.shapes = [fb.shapes[i] for i in keep]
    part.sizes = [fb.sizes[i] for i in keep]
    start = sum(fb.sizes[:keep.start]) if len(keep) else 0
    part.register_buffer("weight", fb.weight.narrow(1, start, sum(part.sizes)))  # a view: B_i stay shared
    return part


class Stage:
    """One process's part of the rule. Subclasses define ``forward`` and ``update``."""

    def __init__(self, rule: Rule, plan: Plan, index: int, owned: list[nn.Module]):
        self.rule, self.plan, self.index = rule, plan, index
        self.num_stages = len(plan.stages)
        self.is_first, self.is_last = index == 0, index == self.num_stages - 1
        ids = {id(t) for m in owned for t in (*m.parameters(), *m.buffers())}
        self.owned_names = [n for n, t in rule.state_dict(keep_vars=True).items() if id(t) in ids]
        self._owned_modules = owned
        self.metrics: dict[str, Tensor] = {}

    def param_groups(self, local_lr: float | None = None) -> list[dict]:
        """``rule.param_groups(local_lr)`` restricted to this stage's tensors (empty groups dropped)."""
        mine = {id(p) for m in self._owned_modules for p in m.parameters()}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in mine]} for g in self.rule.param_groups(local_lr)]
        return [g for g in groups if g["params"]]

    def to(self, device: torch.device) -> Stage:
        for m in self._owned_modules:
            m.to(device)
        self.device = device
        return self

    def owned_state(self) -> dict[str, Tensor]:
        """This stage's parameters and buffers, named as in the whole rule's ``state_dict``, on CPU."""
        sd = self.rule.state_dict(keep_vars=True)
        return {n: sd[n].detach().to("cpu", copy=True) for n in self.owned_names}

    def train(self, mode: bool = True) -> None:
        for m in self._owned_modules:
            m.train(mode)


class Record(NamedTuple):
    """What a stage keeps of a micro-batch until its update."""

    y: Tensor
    outputs: list[Tensor]  # block outputs with graph (direct) / component outputs (AL)
    logits: Tensor | None  # last stage of a direct rule: with graph to the top
    stash: list[tuple[Tensor, Tensor]]  # (parameter, the snapshot the forward used), async only
    #: AL: the decoders' weights at this batch's forward (to decode it later, as one process would);
    #: on the last stage, the decoded estimate itself
    decoders: list[dict[str, Tensor]] | Tensor | None = None


class DirectStage(Stage):
    """Hidden blocks ``plan.stages[index]`` of a direct rule (and the top, on the last stage)."""

    def __init__(self, rule: DirectRule, plan: Plan, index: int):
        units = pipeline_units(rule)
        r = plan.stages[index]
        n_hidden = len(rule._hidden)
        self.hidden_index = range(r.start, min(r.stop, n_hidden))
        self.blocks = [rule._hidden[i] for i in self.hidden_index]
        self.view = restrict(rule, self.hidden_index)
        owned = [*self.blocks, *(mods[i] for mods in per_block_modules(rule) for i in self.hidden_index)]
        top = units[-1] if r.stop == len(units) else []
        self.top = (top[0] if len(top) == 1 else nn.Sequential(*top)) if top else None
        super().__init__(rule, plan, index, owned + list(top))
        #: does a hidden block here need this batch's output error / logits before it can update?
        self.needs_output = bool(self.blocks) and rule.signals_need_output

    def to(self, device):
        super().to(device)
        for name, m in self.view._modules.items():
            if isinstance(m, DirectFeedback):
                m.to(device)  # the narrowed B_i (a copy on another device; fixed, never trained)
        return self

    def forward(self, inputs: Sequence[Tensor], y: Tensor, stash: bool = False) -> tuple[Record, list[Tensor]]:
        """Run the blocks on cut inputs; return the record for the update and the tensors to send on."""
        (h,) = inputs
        saved: list[tuple[Tensor, Tensor]] = []
        if stash:  # weight stashing: the update may come after later ones; autograd must see these weights
            outputs = []
            for block in self.blocks:
                params = dict(block.named_parameters())
                snap = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in params.items()}
                saved += [(params[n], snap[n]) for n in params]
                h = functional_call(block, snap, (h.detach(),))
                outputs.append(h)
        else:
            outputs = run_cut(self.blocks, h)
        logits = None
        if self.top is not None:
            logits = self.top(outputs[-1].detach() if outputs else h.detach())
            send = []
        else:
            send = [outputs[-1].detach()]
        return Record(y, outputs, logits, saved), send

    def output_error(self, record: Record) -> tuple[Tensor, Tensor]:
        """Last stage: the loss and ``e = dL/dlogits`` (N, C)."""
        return self.rule.loss.error(record.logits, record.y)

    def update(self, record: Record, e: Tensor | None, logits: Tensor | None) -> None:
        """Fill ``.grad`` of this stage's tensors from ``e`` (and the top's graph); the caller steps."""
        y, outputs = record.y, record.outputs
        if e is None:  # rules whose signals need no output may still read e's shape and dtype (DRTP)
            p = next(self.rule.model.parameters())
            e = torch.zeros((), dtype=p.dtype, device=y.device).expand(len(y), self.rule.num_classes)
        with torch.no_grad():
            signals = self.view.signals(e, y, outputs) if outputs else []
        local = self.view.local_loss(outputs, logits, y) if outputs else None
        roots, grads = list(outputs), list(signals)
        if record.logits is not None:
            roots.insert(0, record.logits)
            grads.insert(0, e)
        if local is not None:
            roots.append(local)
            grads.append(torch.ones_like(local))
        inject(roots, grads)
        for p, snap in record.stash:
            if snap.grad is not None:
                p.grad = snap.grad


class ALStage(Stage):
    """Components ``plan.stages[index]`` of an Associated Learning network."""

    def __init__(self, rule: AL, plan: Plan, index: int):
        self.component_index = plan.stages[index]
        self.components = [rule.model.components[i] for i in self.component_index]
        super().__init__(rule, plan, index, self.components)
        self.needs_output = False

    def first_inputs(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return [x, F.one_hot(y, self.rule.num_classes).to(x.dtype)]  # s_0 = x, t_0 = onehot(y)

    def forward(self, inputs: Sequence[Tensor], y: Tensor, stash: bool = False) -> tuple[Record, list[Tensor]]:
        s, t = inputs
        outs = []
        for c in self.components:
            out = c(s, t, self.rule.reduction)  # cuts its inputs
            outs.append(out)
            s, t = out.s, out.t
        # The train accuracy decodes b_L(s_L) through h_L .. h_1 at this step's weights (eq. 4.8), as
        # AL.step does: the last stage starts now, the others keep their decoders' weights until then.
        if self.is_last:
            with torch.no_grad():
                decoders = self.decode(outs[-1].bridge.detach())
        else:
            decoders = [{n: p.detach().clone() for n, p in c.h.named_parameters()} for c in self.components]
        return Record(y, outs, None, [], decoders), [s.detach(), t.detach()]

    @torch.no_grad()
    def decode(self, t: Tensor, record: Record | None = None) -> Tensor:
        """``h_a o ... o h_b (t)`` over this stage's components, at the weights ``record`` kept (default: now)."""
        for i in reversed(range(len(self.components))):
            h = self.components[i].h
            t = h(t) if record is None else functional_call(h, record.decoders[i], (t,))
        return t

    def update(self, record: Record, e=None, logits=None) -> Tensor:
        """Backward of this stage's local losses; returns their weighted sum (detached)."""
        rule = self.rule
        assoc = torch.stack([o.assoc_loss for o in record.outputs])
        ae = torch.stack([o.ae_loss for o in record.outputs])
        total = rule.assoc_weight * assoc.sum() + rule.ae_weight * ae.sum()
        total.backward()
        self.metrics = {**{f"assoc_loss/{i + 1}": v for i, v in zip(self.component_index, assoc.detach())},
                        **{f"ae_loss/{i + 1}": v for i, v in zip(self.component_index, ae.detach())}}
        return total.detach()


def make_stage(rule: Rule, plan: Plan, index: int) -> Stage:
    return ALStage(rule, plan, index) if isinstance(rule, AL) else DirectStage(rule, plan, index)


__all__ = ["ALStage", "BALANCES", "DirectStage", "Plan", "Record", "Stage", "make_plan", "make_stage", "partition",
           "pipeline_units", "probe_inputs", "restrict", "unit_costs"]
