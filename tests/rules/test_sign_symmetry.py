import copy
import math

import pytest
import torch

import creditflow as cf
from tests.reference import assert_step_is_mlp_fa, batch, bp_grads, tiny_cnn, tiny_mlp

SIGN_RULES = ["usf", "brsf", "frsf"]


def usf_scale(W, feedback_scale=1.0):
    # std of PyTorch's default layer init, uniform in ±1/sqrt(fan_in): 1/sqrt(3 fan_in)
    return feedback_scale / math.sqrt(3 * math.prod(W.shape[1:]))


def assert_sign_concordant(rule):
    for layer in rule.layers:
        assert torch.equal(torch.sign(layer.feedback), torch.sign(layer.weight.detach()))


@pytest.mark.parametrize("name", SIGN_RULES)
def test_backward_is_fa_with_B_equal_to_magnitude_times_sign_of_W(name):
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    rule = cf.rules.build(name, model, num_classes=3)
    with torch.no_grad():
        for layer in rule.layers:
            layer.weight.neg_()  # W's signs change after construction: the step must follow them
    Ws = [layer.weight.detach().clone() for layer in rule.layers]
    bs = [layer.bias.detach().clone() for layer in rule.layers]
    if name == "usf":
        Bs = [usf_scale(W) * torch.sign(W) for W in Ws]
    else:  # the magnitude held before the step, with the current signs
        Bs = [layer.feedback.abs() * torch.sign(W) for layer, W in zip(rule.layers, Ws)]
    assert not any(torch.equal(torch.sign(B), torch.sign(layer.feedback)) for B, layer in zip(Bs, rule.layers))
    assert_step_is_mlp_fa(rule, model, x, y, Ws, bs, Bs)
    assert_sign_concordant(rule)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_usf_conv_backward_equals_fa_with_B_scaled_sign_of_W(batch_norm):
    model = tiny_cnn(batch_norm=batch_norm)
    x, y = batch(model.input_shape)
    fa_model = copy.deepcopy(model)
    fa = cf.rules.build("fa", fa_model, num_classes=3)
    with torch.no_grad():
        for layer in fa.layers:
            layer.feedback.copy_(usf_scale(layer.weight) * torch.sign(layer.weight))
    usf = cf.rules.build("usf", model, num_classes=3)
    fa.step(x, y)
    usf.step(x, y)
    for (k, p), q in zip(model.named_parameters(), fa_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=k)
    # and the convs' gradients are not BP's: B is not W
    ref = bp_grads(copy.deepcopy(tiny_cnn(batch_norm=batch_norm)), x, y)
    assert not torch.allclose(model[0][0].weight.grad, ref["0.0.weight"])


def test_usf_magnitude_is_the_layer_init_std_times_feedback_scale():
    model = tiny_cnn()
    rule = cf.rules.build("usf", model, num_classes=3, feedback_scale=0.5)
    for layer in rule.layers:
        torch.testing.assert_close(layer.feedback, usf_scale(layer.weight, 0.5) * torch.sign(layer.weight.detach()))


def test_frsf_keeps_its_magnitude_and_brsf_redraws_it_every_batch():
    model = tiny_cnn()
    frsf = cf.rules.build("frsf", model, num_classes=3)
    brsf = cf.rules.build("brsf", tiny_cnn(), num_classes=3)
    fixed = [layer.feedback.abs().clone() for layer in frsf.layers]
    assert_sign_concordant(frsf)
    assert_sign_concordant(brsf)
    opts = [torch.optim.SGD(r.parameters(), lr=2.0) for r in (frsf, brsf)]  # large: signs flip
    flipped = False
    for i in range(3):
        x, y = batch(model.input_shape, seed=i)
        drawn = [layer.feedback.abs().clone() for layer in brsf.layers]
        for rule, opt in zip((frsf, brsf), opts):
            rule.step(x, y)
            assert_sign_concordant(rule)  # B matches the W this step differentiated
            before = [torch.sign(layer.weight.detach()) for layer in rule.layers]
            opt.step()
            opt.zero_grad()
            flipped |= any(not torch.equal(s, torch.sign(layer.weight.detach())) for s, layer in zip(before, rule.layers))
        for layer, m in zip(frsf.layers, fixed):
            assert torch.equal(layer.feedback.abs(), m)
        for layer, m in zip(brsf.layers, drawn):
            bound = 1 / math.sqrt(math.prod(layer.weight.shape[1:]))  # FA's draw: uniform in ±1/sqrt(fan_in)
            assert not torch.equal(layer.feedback.abs(), m) and layer.feedback.abs().max() <= bound
    assert flipped  # the test did exercise sign changes


@pytest.mark.parametrize("name", SIGN_RULES)
def test_feedback_is_a_buffer_not_trained_and_listed_as_mutable(name):
    rule = cf.rules.build(name, tiny_mlp(), num_classes=3)
    trained = {id(p) for p in rule.trainable_parameters()}
    assert not any(id(layer.feedback) in trained for layer in rule.layers)
    assert rule.mutable_buffers == ("feedback",)
    pairs = rule.feedback_pairs()
    assert len(pairs) == len(rule.layers)
