"""Every registered rule through the pipeline, generated from the registry: a rule that can be
pipelined gives, with the synchronous schedule, exactly the parameters of one-process training
(float64); one that cannot is refused with one line saying why and which rules can."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import creditflow as cf
from creditflow.parallel.pipeline import fit
from creditflow.parallel.stages import Stage, check_pipelinable, make_plan
from creditflow.registry import RULES

CLASSES, STEPS = 5, 4
CANDIDATES = ("mlp:20-16-16-16-5", "al-mlp:20-16-12-8-5")  # the first one a rule accepts


def small_rule(name: str):
    torch.manual_seed(0)
    for spec in CANDIDATES:
        model = cf.models.build(spec)
        if RULES.get(name).builder.model_refusal(model) is None:
            return cf.rules.build(name, model, CLASSES).double()
    raise AssertionError(f"rule {name!r} accepts none of {CANDIDATES}")


def batches(n: int = STEPS, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 20, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (size,), generator=g))
            for _ in range(n)]


def one_process(rule, data, optimizer):
    opt = optimizer(rule.param_groups())
    correct = 0
    for x, y in data:
        correct += (rule.step(x, y).logits.argmax(-1) == y).sum().item()
        opt.step()
        opt.zero_grad()
    return correct


PIPELINED = [n for n in cf.rules.available() if RULES.get(n).builder.pipeline_refusal() is None]
LOCKED = [n for n in cf.rules.available() if n not in PIPELINED]


def real_runs() -> list:
    """(rule, stages): 2 stages for every rule, 3 (slow) where the rule's model allows."""
    runs = []
    for name in PIPELINED:
        most = len(small_rule(name).pipeline_cuts()) + 1
        runs.append((name, 2))
        if most >= 3:
            runs.append(pytest.param(name, 3, marks=pytest.mark.slow))
    return runs


@pytest.mark.parametrize("name", PIPELINED)
def test_stages_in_one_process_equal_the_rules_step(name):
    """The stages' code path, stepped in order in one process, against ``rule.step`` (fast, every stage count)."""
    for stages in range(1, len(small_rule(name).pipeline_cuts()) + 2):
        rule, data = small_rule(name), batches()
        single = copy.deepcopy(rule)
        sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
        one_process(single, data, sgd)
        plan = make_plan(rule, stages)
        parts = [Stage(rule, plan, s) for s in range(stages)]
        opts = [sgd(g) if (g := st.param_groups()) else None for st in parts]
        for x, y in data:
            inputs, records = rule.first_inputs(x, y), []
            for st in parts:
                record, pairs, inputs = st.forward(inputs, y)
                records.append((record, pairs))
            error = rule.output_error(records[-1][0])
            for st, (record, pairs), opt in zip(parts, records, opts):
                st.update(record, pairs, error)
                if opt is not None:
                    opt.step()
                    opt.zero_grad()
        for (k, a), b in zip(rule.state_dict().items(), single.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"{stages} stages, {k}: {m}")


@pytest.mark.parametrize("name,stages", real_runs())
def test_sync_pipeline_equals_one_process(name, stages):
    """Real processes (gloo): 2 stages, and 3 where the rule's model allows, equal one process."""
    if True:
        rule, data = small_rule(name), batches()
        single = copy.deepcopy(rule)
        sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
        correct = one_process(single, data, sgd)
        out = fit(rule, data, stages=stages, schedule="sync", optimizer=sgd)
        assert len(out["plan"]) == stages
        assert out["correct"] == correct
        for (k, a), b in zip(rule.state_dict().items(), single.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"{stages} stages, {k}: {m}")


@pytest.mark.parametrize("name", LOCKED)
def test_a_rule_that_cannot_be_pipelined_says_why(name):
    rule = small_rule(name)
    with pytest.raises(ValueError, match=rf"rule '{name}' cannot be pipelined: .*; the pipeline runs al, .*dfa"):
        check_pipelinable(rule, 2, name)


@pytest.fixture(scope="module")
def embedded():
    splits = cf.data.load("fashion-mnist-mini", val_fraction=0.0)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(splits.train), generator=g)[:120 * 64]  # AL leaves the constant answer after ~100
    data = [(splits.normalize(splits.train.images[i]), splits.train.labels[i]) for i in order.split(64)]
    return data, splits.normalize(splits.test.images), splits.test.labels


@pytest.mark.parametrize("name", PIPELINED)
def test_async_pipeline_trains_every_rule_above_chance(name, embedded):
    data, x_test, y_test = embedded
    torch.manual_seed(0)
    spec = next(s for s in ("mlp:784-128-64-10", "al-mlp:784-128-64-10")
                if RULES.get(name).builder.model_refusal(cf.models.build(s)) is None)
    rule = cf.rules.build(name, cf.models.build(spec), 10)
    fit(rule, data, stages=2, schedule="async", optimizer=functools.partial(torch.optim.Adam, lr=2e-3), local_lr=4e-3)
    with torch.no_grad():
        accuracy = (rule.model.eval()(x_test).argmax(-1) == y_test).float().mean().item()
    assert accuracy > 0.3, f"{name}: test accuracy {accuracy:.3f} after 120 async steps (chance 0.1)"
