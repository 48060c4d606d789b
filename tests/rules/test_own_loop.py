"""A rule in the user's own loop: ``out = rule(x)``, any loss, ``backward`` (generated from the registry).

- ``rule(x)`` + ``rule.backward(default loss)`` (``e`` from autograd) equals ``rule.step(x, y)``
  (``e`` in closed form), whose exactness against the papers' equations the rule tests pin;
- backward calls add up (linearity in the loss) for every rule that declares ``linear_in_loss``;
- ``rule.backward(s * L, scale=s)`` scales every gradient by ``s`` (a GradScaler's contract);
- a plain ``loss.backward()`` is the same path as ``rule.backward(loss)``.
"""


import pytest
import torch
from torch.nn import functional as F

import creditflow as cf
from creditflow.registry import RULES as REGISTRY
from tests.reference import batch, rule_and_copy, tiny_mlp

RULES = cf.rules.available()


def fresh_pair(name, kind="mlp"):
    return rule_and_copy(name, kind)


def grads(rule):
    return {n: p.grad.clone() for n, p in rule.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, scale=1.0, tol=1e-12):
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k] * scale, rtol=tol, atol=tol, msg=k)


def forward(rule, x, y):
    return rule(x, y if rule.needs_target else None)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", RULES)
def test_forward_any_loss_backward_equals_step(name, kind):
    a, b = fresh_pair(name, kind)
    x, y = batch(a.model.input_shape)
    torch.manual_seed(0)  # DTP's noise, WM's mirror noise: the same draws on both paths
    out = forward(a, x, y)
    a.backward(a.loss.value(out, y))
    torch.manual_seed(0)
    b.step(x, y)
    assert_same_grads(a, b)
    # and the rule-owned state the step rewrote (KP's B, a mirror, LAS's update_first...) agrees
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        if isinstance(va, torch.Tensor):
            torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", [n for n in RULES if REGISTRY.get(n).builder.linear_in_loss])
def test_backward_calls_add_up_as_autograds_do(name):
    a, b = fresh_pair(name)
    x, y = batch(a.model.input_shape)
    y2 = torch.roll(y, 1)
    out = forward(a, x, y)
    a.backward(0.3 * F.cross_entropy(out, y), retain_graph=True)
    a.backward(-1.7 * (out - 0.5).pow(2).mean())  # a second loss of another form, the same forward
    out = forward(b, x, y)
    b.backward(0.3 * F.cross_entropy(out, y) - 1.7 * (out - 0.5).pow(2).mean())
    assert_same_grads(a, b)
    del y2


@pytest.mark.parametrize("name", RULES)
def test_a_scaled_loss_scales_every_gradient(name):
    a, b = fresh_pair(name)
    x, y = batch(a.model.input_shape)
    s = 1024.0  # a power of two, as a GradScaler's: the scaled gradients are exact
    torch.manual_seed(0)
    out = forward(a, x, y)
    a.backward(s * F.cross_entropy(out, y), scale=s)
    torch.manual_seed(0)
    out = forward(b, x, y)
    b.backward(F.cross_entropy(out, y))
    assert_same_grads(a, b, scale=s, tol=1e-9)


@pytest.mark.parametrize("name", RULES)
def test_a_plain_loss_backward_is_the_rules_backward(name):
    a, b = fresh_pair(name)
    x, y = batch(a.model.input_shape)
    torch.manual_seed(0)
    F.cross_entropy(forward(a, x, y), y).backward()
    torch.manual_seed(0)
    b.backward(F.cross_entropy(forward(b, x, y), y))
    assert_same_grads(a, b)


@pytest.mark.parametrize("name", [n for n in RULES if REGISTRY.get(n).builder.needs_target])
def test_a_rule_that_needs_the_target_says_so(name):
    rule, _ = fresh_pair(name)
    x, _ = batch(rule.model.input_shape)
    with pytest.raises(ValueError, match=r"needs the class target in its forward: out = rule\(x, y\)"):
        rule(x)


def test_outside_training_the_rule_is_the_plain_network():
    rule = cf.rules.build("dfa", tiny_mlp(), num_classes=3)
    x, _ = batch(rule.model.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(rule(x), rule.model(x))
    rule.eval()
    assert rule(x).grad_fn is None or rule(x).grad_fn.name() != "_OutputTapBackward"


@pytest.mark.parametrize("name", RULES)
def test_a_grad_scaler_unscales_the_rules_gradients(name):
    """``rule.backward(scaler.scale(loss), scale=scaler.get_scale())``, then ``scaler.unscale_``:
    the gradients of an unscaled backward, and ``scaler.step``/``update`` run (torch's CPU scaler)."""
    a, b = fresh_pair(name)
    x, y = batch(a.model.input_shape)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = torch.optim.SGD(a.param_groups(), lr=0.1)
    torch.manual_seed(0)
    loss = F.cross_entropy(forward(a, x, y), y)
    a.backward(scaler.scale(loss), scale=scaler.get_scale())
    scaler.unscale_(opt)
    torch.manual_seed(0)
    b.backward(F.cross_entropy(forward(b, x, y), y))
    assert_same_grads(a, b, tol=1e-9)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 12  # finite gradients: the scale stays (growth after 2000 steps)


def test_the_tap_lets_go_of_the_forward_after_a_backward_that_frees_the_graph():
    """A loop holds ``out`` into the next step; what the rule kept of the forward (block outputs)
    must not stay alive with it once the graph is freed, and must stay while it is retained."""
    rule = cf.rules.build("dfa", tiny_mlp(), num_classes=3)
    x, y = batch(rule.model.input_shape)
    out = rule(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    assert out.grad_fn.on_error is not None  # retained: a second backward may come
    F.cross_entropy(out, y).backward()
    assert out.grad_fn.on_error is None
