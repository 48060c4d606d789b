"""``torch.compile`` and the rules, generated from the registry (backend ``aot_eager``: the graphs
Dynamo captures and AOTAutograd's backward, without inductor's code generation, so it runs in seconds;
inductor's step times are in benchmarks/compile_step_time.py)."""

import copy

import pytest
import torch

import creditflow as cf
from tests.reference import batch, tiny_mlp, tiny_model_for

RULES = cf.rules.available()


def float_rule(name):
    return cf.rules.build(name, tiny_model_for(name).float(), num_classes=3)


def grads(rule):
    return {n: p.grad for n, p in rule.named_parameters() if p.grad is not None}


def two_steps(rule, x, y):
    opt = torch.optim.SGD(rule.param_groups(), lr=0.1)
    for _ in range(2):  # the second step runs the compiled graphs again (guards, no recompile)
        torch.manual_seed(0)
        rule.step(x, y)
        opt.step()
        opt.zero_grad()
    torch.manual_seed(0)
    rule.step(x, y)
    return grads(rule)


@pytest.mark.parametrize("name", RULES)
def test_a_compiled_rule_steps_as_the_eager_one(name):
    torch._dynamo.reset()
    eager = float_rule(name)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    x, y = batch(eager.model.input_shape, n=16)
    x = x.float()
    want, got = two_steps(eager, x, y), two_steps(compiled, x, y)
    assert want.keys() == got.keys() and want
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["fa", "dfa"])
def test_feedback_layers_and_cuts_compile_without_a_graph_break(name):
    """``fullgraph=True``: Dynamo errors on any break, so each compiled part is one graph."""
    torch._dynamo.reset()
    rule = float_rule(name)
    eager = copy.deepcopy(rule)
    rule.compile(backend="aot_eager", fullgraph=True)
    x, y = batch(rule.model.input_shape, n=16)
    x = x.float()
    torch._dynamo.utils.counters.clear()
    rule.step(x, y)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph: the whole forward
    eager.step(x, y)
    for k, g in grads(eager).items():
        torch.testing.assert_close(grads(rule)[k], g, rtol=1e-5, atol=1e-6)


def test_a_model_compiled_before_the_rule_is_built_is_accepted():
    torch._dynamo.reset()
    model = tiny_mlp(unused_parameter=False).float()
    eager = cf.rules.build("dfa", copy.deepcopy(model), num_classes=3, seed=0)
    rule = cf.rules.build("dfa", torch.compile(model, backend="aot_eager"), num_classes=3, seed=0)
    assert rule.model is model  # the module itself; the rule compiles its forward (inductor by default)
    rule.compile(backend="aot_eager")  # keep this test fast: aot_eager instead of inductor
    x, y = batch(model.input_shape, n=16)
    x = x.float()
    rule.step(x, y)
    eager.step(x, y)
    for k, g in grads(eager).items():
        torch.testing.assert_close(grads(rule)[k], g, rtol=1e-5, atol=1e-6)
