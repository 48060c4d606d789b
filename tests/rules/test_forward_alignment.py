import copy

import pytest
import torch

import creditflow as cf
from creditflow.mechanisms.feedback import active_policy
from tests.reference import batch, bp_grads, output_error, tiny_cnn, tiny_mlp


def test_foa_matches_the_theses_equations_on_a_tiny_mlp():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    ref = copy.deepcopy(model)
    rule = cf.rules.build("foa", model, num_classes=3)
    C = [c.clone() for c in rule.C]  # fixed random forward weights, (out, in) like W
    rule.step(x, y)
    # By hand, Woo 2023 eqs. 3.7-3.10 with ReLU and biases.
    W = [ref[0][0].weight, ref[1][0].weight, ref[2].weight]
    b = [ref[0][0].bias, ref[1][0].bias, ref[2].bias]
    with torch.no_grad():
        a1 = x @ W[0].T + b[0]
        h1 = a1.clamp_min(0)
        a2 = h1 @ W[1].T + b[1]
        h2 = a2.clamp_min(0)
        logits = h2 @ W[2].T + b[2]  # eq. 3.7: the true path makes the output
        t1 = (x @ C[0].T + b[0]).clamp_min(0)  # eq. 3.8: h~_1 = phi(C_1 x + b_1)
        t2 = (t1 @ C[1].T + b[1]).clamp_min(0)  # h~_2
        d3 = output_error(logits, y)
        d2 = (d3 @ W[2]) * (a2 > 0).double()  # eq. 3.9: exact errors through W
        d1 = (d2 @ W[1]) * (a1 > 0).double()
    expected_W = [d1.T @ x, d2.T @ t1, d3.T @ t2]  # eq. 3.10: delta h~^T
    expected_b = [d1.sum(0), d2.sum(0), d3.sum(0)]
    layers = [model[0][0], model[1][0], model[2]]
    for layer, gW, gb in zip(layers, expected_W, expected_b):
        torch.testing.assert_close(layer.weight.grad, gW)
        torch.testing.assert_close(layer.bias.grad, gb)
    assert not torch.allclose(expected_W[1], d2.T @ h1)  # h~ really differs from h
    assert model[0].unused.grad is None


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn, lambda: tiny_cnn(batch_norm=True)],
                         ids=["mlp", "cnn", "cnn-bn"])
def test_foa_with_C_equal_to_W_is_bp(make):
    model = make()
    x, y = batch(model.input_shape)
    ref = copy.deepcopy(model)
    expected = bp_grads(ref, x, y)
    rule = cf.rules.build("foa", model, num_classes=3)
    with torch.no_grad():
        for C, layer in zip(rule.C, rule.layers):
            C.copy_(layer.weight)  # h~ = h: the approximate path is the true one
    rule.step(x, y)
    for k, p in model.named_parameters():
        if k in expected:
            torch.testing.assert_close(p.grad, expected[k])
    # The approximate path leaves BatchNorm's running statistics alone: one update, as BP's.
    buffers = dict(model.named_buffers())
    for k, v_ref in ref.named_buffers():
        torch.testing.assert_close(buffers[k], v_ref)


def test_foa_feedback_is_w_through_optimizer_steps_and_c_stays_fixed():
    model = tiny_cnn(batch_norm=True)
    rule = cf.rules.build("foa", model, num_classes=3, forward_scale=0.5)
    C0 = [c.clone() for c in rule.C]
    opt = torch.optim.SGD(rule.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        rule.step(*batch(model.input_shape))
        opt.step()
        opt.zero_grad()
    for layer, c, c0 in zip(rule.layers, rule.C, C0):
        assert torch.equal(layer.feedback, layer.weight.detach())
        assert torch.equal(c, c0)
        assert active_policy() is None  # nothing held between steps
    assert not any(c is p for c in rule.C for p in rule.trainable_parameters())
    pairs = rule.feedback_pairs()
    assert set(pairs) == {f"layer{i}" for i in range(len(rule.layers))}
    with pytest.raises(ValueError, match="forward_scale must be > 0"):
        cf.rules.build("foa", tiny_mlp(), num_classes=3, forward_scale=0)



class _Spare(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.used(x).relu()  # ``spare`` never runs: it has no h~


def test_foa_needs_every_layer_once_per_forward():
    model = torch.nn.Sequential(_Spare(), torch.nn.Linear(6, 3)).double()
    rule = cf.rules.build("foa", model, num_classes=3)
    with pytest.raises(ValueError, match="exactly once"):
        rule.step(*batch((6,)))
    assert active_policy() is None
