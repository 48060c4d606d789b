"""Every rule's step under bfloat16 autocast (CPU), generated from the registry: it runs, its
gradients are finite and agree with the float32 step's.

The measure: the cosine between each tensor's bf16 and fp32 gradients, over the tensors whose fp32
gradient is not vanishing (norm >= 1e-4 of the rule's largest): a conv bias before BatchNorm has
an exact gradient of 0, so its fp32 gradient (~1e-9) is rounding noise and no direction to agree
with. Threshold 0.999 per tensor (measured minimum 0.9998, DFA and FoA on the MLP; bf16 keeps 8 bits of
mantissa: a product of two bf16 roundings
has a relative error near 2^-8 per element, which averages out in a gradient's direction).
"""


import pytest
import torch
from torch.nn import functional as F

import creditflow as cf
from creditflow.registry import RULES as REGISTRY
from tests.reference import batch, rule_and_copy, tiny_model_for

RULES = cf.rules.available()
MIN_COSINE = 0.999


def float_model(name, kind):
    return tiny_model_for(name, kind).float()


def agreement(rule, ref):
    """Per tensor: cosine of the two gradients, for tensors with a non-vanishing fp32 gradient."""
    grads = {n: p.grad for n, p in rule.named_parameters() if p.grad is not None}
    refs = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == refs.keys() and refs
    largest = max(g.norm() for g in refs.values())
    return {n: F.cosine_similarity(grads[n].flatten().double(), refs[n].flatten().double(), dim=0).item()
            for n in refs if refs[n].norm() >= 1e-4 * largest}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", RULES)
def test_every_rule_steps_under_bf16_autocast_and_agrees_with_fp32(name, kind):
    rule, ref = rule_and_copy(name, kind, torch.float32)
    x, y = batch(rule.model.input_shape, n=32)
    x = x.float()
    torch.manual_seed(0)
    ref.step(x, y)
    torch.manual_seed(0)
    with torch.autocast("cpu", torch.bfloat16):
        rule.step(x, y)
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == p.dtype
               for p in rule.parameters() if p.grad is not None)
    cosines = agreement(rule, ref)
    worst = min(cosines, key=cosines.get)
    assert cosines[worst] >= MIN_COSINE, f"{name}/{kind}: {worst} cosine {cosines[worst]:.4f}"


@pytest.mark.parametrize("name", [n for n in RULES if not REGISTRY.get(n).builder.needs_target])
def test_the_backward_may_run_outside_autocast(name):
    """The usual loop: forward and loss under autocast, ``backward`` after the ``with`` block."""
    model = float_model(name, "mlp")
    if REGISTRY.get(name).builder.model_refusal(model):
        pytest.skip(f"{name} does not train this model")
    rule = cf.rules.build(name, model, num_classes=3)
    x, y = batch(model.input_shape, n=32)
    with torch.autocast("cpu", torch.bfloat16):
        loss = F.cross_entropy(rule(x.float()), y)
    rule.backward(loss)
    assert all(torch.isfinite(p.grad).all() for p in rule.parameters() if p.grad is not None)
