"""Pipeline stages: a rule's units cut into contiguous groups, one per process.

A *unit* is what the rule says it is (:class:`~creditflow.rules.base.UnitRule`): a direct rule's
hidden blocks and its top, Associated Learning's components. Units are split into S contiguous
stages by :func:`partition`, at the boundaries the rule allows (``rule.pipeline_cuts()``), balanced
on a per-unit cost (parameter count, or measured step time).

Every process builds the *whole* rule from the same seed (so every stage starts from the weights
the single-process trainer would have), then keeps a :class:`Stage` over its own units. A stage
runs the rule's own parts on its range (``forward_units``, ``output_error``, ``backward_units``,
``prediction``, ``decode_units``, ``before_step``/``after_backward``): nothing of a rule's update is
written here, so a rule cannot behave differently in a stage.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..mechanisms.modes import eval_mode, probe_batch
from ..rules.base import OutputError, Rule, UnitRule, UnitsRecord  # noqa: F401  (UnitRule: annotations)

BALANCES = ("params", "time")


def check_pipelinable(rule: Rule, stages: int | None = None, name: str | None = None) -> None:
    """One-line ValueError if ``rule`` cannot run as a pipeline (of ``stages`` stages)."""
    name = name or type(rule).__name__
    refusal = type(rule).pipeline_refusal(rule)
    if refusal:
        raise ValueError(f"rule {name!r} cannot be pipelined: {refusal}; the pipeline runs {', '.join(pipelinable_rules())}")
    if stages is not None:
        most = len(rule.pipeline_cuts()) + 1
        if not 1 <= stages <= most:
            raise ValueError(f"rule {name!r} on this model splits into at most {most} pipeline stages "
                             f"({rule.num_units()} units, cuts allowed at {sorted(rule.pipeline_cuts()) or 'none'}); "
                             f"use --stages 1..{most}")


def pipelinable_rules() -> list[str]:
    from ..registry import RULES

    return [n for n in RULES.available() if RULES.get(n).builder.pipeline_refusal() is None]


def unit_owned(rule: UnitRule) -> list[list[nn.Module]]:
    """The modules each unit trains and keeps; every trainable tensor of the rule must be in one."""
    owned = [rule.unit_modules(i) for i in range(rule.num_units())]
    where: dict[int, int] = {}
    for i, mods in enumerate(owned):
        for m in mods:
            for p in m.parameters():
                if where.setdefault(id(p), i) != i:
                    raise ValueError(f"cannot split rule {type(rule).__name__} into pipeline stages: a tensor is "
                                     f"trained by units {where[id(p)]} and {i}")
    names = [n for n, p in rule.named_parameters() if p.requires_grad and id(p) not in where]
    if names:
        raise ValueError(f"cannot split rule {type(rule).__name__} into pipeline stages: {names[0]!r} belongs to no "
                         "unit (UnitRule.unit_modules)")
    return owned


def partition(costs: Sequence[float], stages: int, cuts: set[int] | None = None) -> list[range]:
    """Contiguous split of units into ``stages`` non-empty groups minimising the largest group cost.

    ``cuts``: the boundaries allowed (``i``: between unit i-1 and i; default all). Exact dynamic
    programme (O(S n^2), n units); ties keep earlier groups small.
    """
    n = len(costs)
    cuts = set(range(1, n)) if cuts is None else set(cuts)
    if not 1 <= stages <= min(n, len(cuts) + 1):
        raise ValueError(f"cannot split {n} pipeline units into {stages} stages; use --stages 1..{len(cuts) + 1}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[s][i]: first i units in s stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            if i < n and i not in cuts:
                continue  # a stage may not end here
            for j in range(s - 1, i):
                if j and j not in cuts:
                    continue
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i] - 1e-12 * max(1.0, abs(v)):
                    best[s][i], cut[s][i] = v, j
    bounds, i = [n], n
    for s in range(stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    bounds.reverse()
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def unit_costs(rule: UnitRule, balance: str, batch_size: int = 64, repeats: int = 3,
               device: torch.device | str | None = None) -> list[float]:
    """Per-unit cost: ``"params"`` (trainable parameter count, the rule's per-unit modules included) or
    ``"time"`` (median seconds of the unit's forward and backward on a zero batch of ``batch_size``,
    on a copy of the rule on ``device`` if given)."""
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; available: {', '.join(BALANCES)}")
    if balance == "params":
        return [float(sum(p.numel() for m in mods for p in m.parameters() if p.requires_grad))
                for mods in unit_owned(rule)]
    if device is not None and torch.device(device) != next(rule.model.parameters()).device:
        rule = copy.deepcopy(rule).to(device)
    inputs, y = probe_inputs(rule, batch_size)
    p = next(rule.model.parameters())
    costs = []
    for i in range(rule.num_units()):
        units = range(i, i + 1)
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            record, _ = rule.forward_units(units, inputs[i], y)
            error = rule.output_error(record)
            if error is None and rule.waits_for_error(units):
                e = torch.randn(len(y), rule.num_classes, dtype=p.dtype, device=p.device)
                error = OutputError(e.sum(), e, torch.zeros_like(e))
            rule.backward_units(record, error)
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)
            times.append(time.perf_counter() - start)
        rule.zero_grad(set_to_none=True)
        costs.append(sorted(times[1:])[len(times[1:]) // 2])
    return costs


@torch.no_grad()
def probe_inputs(rule: UnitRule, batch: int = 2) -> tuple[list[tuple[Tensor, ...]], Tensor]:
    """The inputs of every unit for a zero batch (eval mode, modes restored), and its labels."""
    x = probe_batch(rule.model, getattr(rule, "input_shape", None) or rule.model.input_shape, batch)
    y = torch.zeros(batch, dtype=torch.long, device=x.device)
    inputs = [rule.first_inputs(x, y)]
    with eval_mode(rule):
        for i in range(rule.num_units() - 1):
            inputs.append(rule.forward_units(range(i, i + 1), inputs[-1], y)[1])
    return inputs, y


class Plan(NamedTuple):
    """Which units each stage holds, and what crosses each boundary."""

    stages: list[range]  # unit indices per stage
    costs: list[float]  # per unit
    balance: str
    #: per stage: per-sample shape of each tensor it receives (its first unit's inputs)
    inputs: list[list[tuple[int, ...]]]

    def plain(self) -> dict:
        """The plan as plain data (ranges as ``[start, stop]``): what crosses processes (parallel/messages.py)."""
        return {"stages": [[r.start, r.stop] for r in self.stages], "costs": list(self.costs),
                "balance": self.balance, "inputs": [[list(s) for s in shapes] for shapes in self.inputs]}

    @classmethod
    def from_plain(cls, d: dict) -> Plan:
        return cls([range(*r) for r in d["stages"]], d["costs"], d["balance"],
                   [[tuple(s) for s in shapes] for shapes in d["inputs"]])

    def describe(self, rule: UnitRule) -> list[str]:
        return [f"stage {s}: {', '.join(rule.unit_name(i) for i in r)} "
                f"(cost {sum(self.costs[i] for i in r):.3g} {self.balance})" for s, r in enumerate(self.stages)]


def make_plan(rule: UnitRule, stages: int, balance: str = "params", batch_size: int = 64,
              device: torch.device | str | None = None, parts: Sequence[range] | None = None) -> Plan:
    """Split ``rule`` into ``stages`` (see :func:`unit_costs` for ``balance``), or take ``parts`` as given."""
    check_pipelinable(rule, stages)
    costs = unit_costs(rule, balance, batch_size, device=device)
    parts = list(parts) if parts is not None else partition(costs, stages, rule.pipeline_cuts())
    probes, _ = probe_inputs(rule)
    return Plan(parts, costs, balance, [[tuple(t.shape[1:]) for t in probes[r.start]] for r in parts])


class Stage:
    """One process's units of the rule, run with the rule's own parts."""

    def __init__(self, rule: UnitRule, plan: Plan, index: int):
        self.rule, self.plan, self.index = rule, plan, index
        self.units = plan.stages[index]
        self.num_stages = len(plan.stages)
        self.is_first, self.is_last = index == 0, index == self.num_stages - 1
        owned = unit_owned(rule)
        self.owned = [m for i in self.units for m in owned[i]]
        ids = {id(t) for m in self.owned for t in (*m.parameters(), *m.buffers())}
        self.owned_names = [n for n, t in rule.state_dict(keep_vars=True).items() if id(t) in ids]
        #: does this stage wait for the last stage's output error before it can update?
        self.waits_for_error = not self.is_last and rule.waits_for_error(self.units)
        self.device = torch.device("cpu")

    def param_groups(self, local_lr: float | None = None) -> list[dict]:
        """``rule.param_groups(local_lr)`` restricted to this stage's tensors (empty groups dropped)."""
        mine = {id(p) for m in self.owned for p in m.parameters()}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in mine]} for g in self.rule.param_groups(local_lr)]
        return [g for g in groups if g["params"]]

    def to(self, device: torch.device) -> Stage:
        self.rule.to(device)  # the other units' copies too: small, and the rule's own tensors follow
        self.device = device
        return self

    def owned_state(self) -> dict[str, Tensor]:
        """This stage's parameters and buffers, named as in the whole rule's ``state_dict``, on CPU."""
        sd = self.rule.state_dict(keep_vars=True)
        return {n: sd[n].detach().to("cpu", copy=True) for n in self.owned_names}

    def train(self, mode: bool = True) -> None:
        for m in self.owned:
            m.train(mode)

    def forward(self, inputs: Sequence[Tensor], y: Tensor, stash: bool = False):
        """``(record, stash pairs, tensors for the next stage)``: the rule's forward on this range.

        ``stash``: the update may come after later ones (async), so the forward runs on snapshots of
        the stage's weights, which autograd keeps; their gradients go to the live weights.
        """
        self.rule.before_step()
        with stashed(self.owned, stash) as pairs, self.rule.forward_context(inputs[0]):
            record, send = self.rule.forward_units(self.units, inputs, y)
        return record, pairs, send

    def update(self, record: UnitsRecord, pairs, error: OutputError | None) -> Tensor | None:
        """Fill ``.grad`` of this stage's tensors (the caller steps); this range's part of the loss."""
        part = self.rule.backward_units(record, error)
        for p, snap in pairs:
            if snap.grad is not None:
                p.grad = snap.grad
        self.rule.after_backward(1.0)
        return part


@contextmanager
def stashed(modules: Sequence[nn.Module], enabled: bool = True) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Inside, every parameter of ``modules`` is replaced by a detached copy (weight stashing);
    yields ``[(parameter, copy)]``. The graph built inside keeps the copies."""
    swaps: list[tuple[nn.Module, str, Tensor, Tensor]] = []
    if enabled:
        seen = set()
        for top in modules:
            for m in top.modules():
                for name, p in list(m._parameters.items()):
                    if p is None or (id(m), name) in seen:
                        continue
                    seen.add((id(m), name))
                    snap = p.detach().clone().requires_grad_(p.requires_grad)
                    m._parameters[name] = snap
                    swaps.append((m, name, p, snap))
    try:
        yield [(p, snap) for _, _, p, snap in swaps]
    finally:
        for m, name, p, _ in swaps:
            m._parameters[name] = p


__all__ = ["BALANCES", "Plan", "Stage", "check_pipelinable", "make_plan", "partition", "probe_inputs", "stashed",
           "unit_costs", "unit_owned"]
