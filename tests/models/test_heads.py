"""The ``head`` model option: ``fa-bn``, the ASAP authors' classifier (FA with a fixed U(-1, 1) B, then
BatchNorm1d), under every rule that trains the model (generated from the registry)."""

import copy

import pytest
import torch
from torch import nn

import creditflow as cf
from creditflow.mechanisms.feedback import FeedbackLinear
from creditflow.registry import RULES


def fa_head_net(name="resnet18"):
    torch.manual_seed(0)
    if name.startswith("resnet"):
        return cf.models.build(name, head="fa-bn", width=4)
    return cf.models.build(f"{name}:4-4-4", head="fa-bn", fc="8-8", batch_norm=True)


@pytest.mark.parametrize("name", ["resnet18", "resnet18-nsc", "alexnet-asap"])
def test_fa_bn_head_is_a_fixed_feedback_linear_then_batch_norm(name):
    model = fa_head_net(name)
    linear, norm = model.head[-2], model.head[-1]
    assert isinstance(linear, FeedbackLinear) and isinstance(norm, nn.BatchNorm1d)
    B = linear.feedback
    assert not isinstance(B, nn.Parameter) and B.shape == linear.weight.shape
    assert -1 <= B.min() < -0.5 and 0.5 < B.max() <= 1  # U(-1, 1), not the weight init's 1/sqrt(fan_in)
    # the body receives the error through B, not W: grad_input = grad_out @ B
    x = torch.randn(5, linear.in_features, requires_grad=True)
    g = torch.randn(5, linear.out_features)
    linear(x).backward(g)
    torch.testing.assert_close(x.grad, g @ B)
    plain = cf.models.build(name, **({"width": 4} if name != "alexnet-asap" else {}))
    assert not any(isinstance(m, FeedbackLinear) for m in plain.modules())  # the default head: a plain Linear


def test_an_unknown_head_is_one_line():
    with pytest.raises(ValueError, match="unknown head 'fa'; available: linear, fa-bn"):
        cf.models.build("resnet18", width=4, head="fa")


@pytest.mark.parametrize("rule_name", cf.rules.available())
def test_every_rule_trains_the_body_and_leaves_the_heads_feedback_fixed(rule_name):
    model = fa_head_net()
    if RULES.get(rule_name).builder.model_refusal(model):
        pytest.skip(f"{rule_name} does not train resnet18")
    rule = cf.rules.build(rule_name, model, num_classes=10)
    B0 = model.head[-2].feedback.clone()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(rule.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        loss = rule.step(x, y).loss
        opt.step()
    assert torch.isfinite(torch.as_tensor(loss)).all()
    assert torch.equal(model.head[-2].feedback, B0)  # no rule's update reaches the fixed B
    changed = {k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
    assert "9.2.weight" in changed  # the head learns
    assert any(k.startswith("8.") for k in changed)  # and the last hidden block does
