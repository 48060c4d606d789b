import copy

import pytest
import torch

import creditflow as cf
from tests.reference import assert_step_is_mlp_fa, batch, bp_grads, tiny_cnn, tiny_mlp


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn, lambda: tiny_cnn(batch_norm=True)])
def test_fa_with_B_equal_to_W_is_bp(make):
    model = make()
    x, y = batch(model.input_shape)
    ref = bp_grads(copy.deepcopy(model), x, y)
    rule = cf.rules.build("fa", model, num_classes=3)
    for layer in rule.layers:
        layer.feedback.copy_(layer.weight)  # B = W^T in the papers' notation
    rule.step(x, y)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_fa_matches_hand_derived_update():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    rule = cf.rules.build("fa", model, num_classes=3)
    Ws = [layer.weight.detach() for layer in rule.layers]
    bs = [layer.bias.detach() for layer in rule.layers]
    Bs = [layer.feedback for layer in rule.layers]
    assert not any(torch.equal(W, B) for W, B in zip(Ws, Bs))
    assert_step_is_mlp_fa(rule, model, x, y, Ws, bs, Bs)


def test_fa_feedback_is_fixed_and_not_trained():
    model = tiny_cnn()
    rule = cf.rules.build("fa", model, num_classes=3)
    before = [layer.feedback.clone() for layer in rule.layers]
    trained = {id(p) for p in rule.trainable_parameters()}
    assert not any(id(layer.feedback) in trained for layer in rule.layers)
    opt = torch.optim.SGD(rule.trainable_parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        rule.step(*batch(model.input_shape))
        opt.step()
        opt.zero_grad()
    for layer, b in zip(rule.layers, before):
        assert torch.equal(layer.feedback, b)
        assert not torch.equal(layer.weight, layer.feedback)
