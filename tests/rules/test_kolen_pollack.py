import copy

import pytest
import torch

import creditflow as cf
from tests.reference import batch, bp_grads, mlp_fa_grads, tiny_cnn, tiny_mlp


def copy_W_into_B(rule):
    with torch.no_grad():
        for layer in rule.layers:
            layer.feedback.copy_(layer.weight)  # B = W^T in the papers' notation


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn, lambda: tiny_cnn(batch_norm=True)])
def test_kp_with_B_equal_to_W_is_bp_and_B_gets_W_gradient(make):
    model = make()
    x, y = batch(model.input_shape)
    ref = bp_grads(copy.deepcopy(model), x, y)
    rule = cf.rules.build("kp", model, num_classes=3, kp_decay=0.0)
    copy_W_into_B(rule)
    rule.step(x, y)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None and not k.endswith("feedback")}
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    for layer in rule.layers:
        assert torch.equal(layer.feedback.grad, layer.weight.grad)
        assert layer.feedback.grad.data_ptr() != layer.weight.grad.data_ptr()


def test_kp_with_B_starting_at_W_trains_exactly_like_bp():
    bp_model, kp_model = tiny_cnn(batch_norm=True), tiny_cnn(batch_norm=True)
    bp = cf.rules.build("bp", bp_model, num_classes=3)
    kp = cf.rules.build("kp", kp_model, num_classes=3, kp_decay=0.0)
    copy_W_into_B(kp)
    opts = [torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01) for r in (bp, kp)]
    for i in range(3):
        for rule, opt in zip((bp, kp), opts):
            rule.step(*batch(bp_model.input_shape, seed=i))
            opt.step()
            opt.zero_grad()
    for (k, p), q in zip(bp_model.named_parameters(), (q for k, q in kp_model.named_parameters() if "feedback" not in k)):
        torch.testing.assert_close(q, p, msg=k)
    for layer in kp.layers:
        assert torch.equal(layer.feedback, layer.weight)  # identical updates keep B = W


def test_kp_matches_hand_derived_update():
    lam = 0.03
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    rule = cf.rules.build("kp", model, num_classes=3, kp_decay=lam)
    Ws = [layer.weight.detach().clone() for layer in rule.layers]
    bs = [layer.bias.detach().clone() for layer in rule.layers]
    Bs = [layer.feedback.detach().clone() for layer in rule.layers]
    assert not any(torch.equal(W, B) for W, B in zip(Ws, Bs))
    gW, gb = mlp_fa_grads(Ws, bs, x, y, Bs)  # delta goes down through B, as FA
    rule.step(x, y)
    for layer, w, b, W, B in zip(rule.layers, gW, gb, Ws, Bs):
        torch.testing.assert_close(layer.weight.grad, w + lam * W)  # delta h^T + lambda W
        torch.testing.assert_close(layer.feedback.grad, w + lam * B)  # delta h^T + lambda B
        torch.testing.assert_close(layer.bias.grad, b)  # biases: no KP decay
    assert model[0].unused.grad is None


@pytest.mark.parametrize("kp_decay,opt_decay", [(0.05, 0.0), (0.0, 0.05), (0.02, 0.03)])
def test_W_minus_B_decays_as_one_minus_eta_lambda_to_the_t(kp_decay, opt_decay):
    """Plain SGD, step eta, on W and B; decay lambda = kp_decay + the optimizer's weight_decay:
    W_t - B_t = (1 - eta lambda)^t (W_0 - B_0), whatever the data (float64, to rounding)."""
    eta, steps = 0.2, 6
    model = tiny_mlp(dims=(6, 5, 4, 3))
    rule = cf.rules.build("kp", model, num_classes=3, kp_decay=kp_decay)
    W0 = [layer.weight.detach().clone() for layer in rule.layers]
    gap0 = [(layer.weight - layer.feedback).detach().clone() for layer in rule.layers]
    opt = torch.optim.SGD(rule.param_groups(), lr=eta, weight_decay=opt_decay)
    for t in range(steps):
        rule.step(*batch(model.input_shape, seed=t))
        opt.step()
        opt.zero_grad()
    factor = (1 - eta * (kp_decay + opt_decay)) ** steps
    for layer, g0, w0 in zip(rule.layers, gap0, W0):
        assert not torch.allclose(layer.weight, w0)  # W did learn
        torch.testing.assert_close(layer.weight - layer.feedback, factor * g0, rtol=0, atol=1e-14)


def test_B_is_a_trained_parameter_in_its_own_group_with_the_state_dict_key_of_fa():
    model = tiny_cnn()
    rule = cf.rules.build("kp", model, num_classes=3)
    Bs = [layer.feedback for layer in rule.layers]
    assert all(isinstance(B, torch.nn.Parameter) and B.requires_grad for B in Bs)
    trained = {id(p) for p in rule.trainable_parameters()}
    assert all(id(B) in trained for B in Bs)
    assert [id(p) for p in rule.local_parameters()] == [id(B) for B in Bs]
    groups = rule.param_groups(local_lr=0.5)
    assert len(groups) == 2 and groups[1]["params"] == Bs and groups[1]["lr"] == 0.5
    assert not any(id(B) in {id(p) for p in groups[0]["params"]} for B in Bs)
    fa_keys = set(cf.rules.build("fa", tiny_cnn(), num_classes=3).state_dict())
    assert set(rule.state_dict()) == fa_keys
    assert not any(name.endswith("feedback") for name, _ in rule.named_buffers())


def test_kp_conv_gradients_use_B():
    model = tiny_cnn()
    x, y = batch(model.input_shape)
    ref = bp_grads(copy.deepcopy(model), x, y)
    rule = cf.rules.build("kp", model, num_classes=3, kp_decay=0.0)
    rule.step(x, y)
    assert not torch.allclose(model[0][0].weight.grad, ref["0.0.weight"])  # B != W below the head
    torch.testing.assert_close(model[-1].weight.grad, ref["3.weight"])  # the head's own gradient is BP's


def test_bad_kp_decay_is_a_clear_error():
    with pytest.raises(ValueError, match="kp_decay must be >= 0"):
        cf.rules.build("kp", tiny_mlp(), num_classes=3, kp_decay=-1)
