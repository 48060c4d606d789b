import copy

import pytest
import torch
from torch import nn

import creditflow as cf
from tests.reference import batch, bp_grads, mlp_fa_grads, tiny_cnn, tiny_mlp


def hand_mirror(layers, B0, n, sigma, eta, lam):
    """B <- (1 - lambda) B + eta/n sum_k y_k x_k^T with y_k = W x_k, drawn as the rule draws its noise.

    Conv layers: x_k is a kernel-sized noise image and y_k[o] = sum_{c,i,j} W[o,c,i,j] x_k[c,i,j].
    """
    out = []
    for layer, B in zip(layers, B0):
        W = layer.weight.detach()
        x = torch.randn(n, *W.shape[1:], dtype=W.dtype) * sigma  # (n, in) or (n, C_in, k, k)
        y = torch.einsum("o...,k...->ko", W, x)  # (n, out): W x_k, no bias
        yx = sum(torch.einsum("o,...->o...", y[k], x[k]) for k in range(n))  # sum_k y_k x_k^T
        out.append((1 - lam) * B + eta * yx / n)
    return out


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
def test_mirror_update_equals_hand_computed_y_x_transpose(make):
    rule = cf.rules.build("wm", make(), num_classes=3, mirror_lr=0.3, mirror_noise=0.7, mirror_decay=0.1,
                          mirror_batch=5)
    B0 = [layer.feedback.clone() for layer in rule.layers]
    torch.manual_seed(11)
    rule.mirror()
    torch.manual_seed(11)
    expected = hand_mirror(rule.layers, B0, n=5, sigma=0.7, eta=0.3, lam=0.1)
    for layer, B in zip(rule.layers, expected):
        torch.testing.assert_close(layer.feedback, B)


def test_step_is_fa_through_B_then_one_mirror_phase():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    rule = cf.rules.build("wm", model, num_classes=3, mirror_batch=4)
    Ws = [layer.weight.detach().clone() for layer in rule.layers]
    bs = [layer.bias.detach().clone() for layer in rule.layers]
    Bs = [layer.feedback.clone() for layer in rule.layers]
    gW, gb = mlp_fa_grads(Ws, bs, x, y, Bs)
    torch.manual_seed(3)
    rule.step(x, y)
    for layer, w, b in zip(rule.layers, gW, gb):
        torch.testing.assert_close(layer.weight.grad, w)
        torch.testing.assert_close(layer.bias.grad, b)
    assert model[0].unused.grad is None
    torch.manual_seed(3)
    eta, sigma = 0.01, 1.0  # defaults; lambda = eta sigma^2
    for layer, B in zip(rule.layers, hand_mirror(rule.layers, Bs, 4, sigma, eta, eta * sigma**2)):
        torch.testing.assert_close(layer.feedback, B)


@pytest.mark.parametrize("layer", [nn.Linear(20, 10), nn.Conv2d(4, 6, 3, padding=1),
                                   nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2)])
def test_repeated_mirror_phases_align_B_with_W(layer):
    torch.manual_seed(0)
    rule = cf.rules.build("wm", nn.Sequential(layer.double()), num_classes=10, mirror_lr=0.05)
    (fb,) = rule.layers
    W = fb.weight.detach()

    def cos():
        return torch.nn.functional.cosine_similarity(fb.feedback.flatten(), W.flatten(), dim=0).item()

    assert abs(cos()) < 0.5  # random B_0
    for _ in range(300):
        rule.mirror()
    assert cos() > 0.95
    # lambda = eta sigma^2: B converges to W itself, not only to its direction
    assert (fb.feedback - W).norm() < 0.3 * W.norm()


def test_mirror_every_counts_steps_through_a_state_dict_round_trip():
    model = tiny_mlp()
    rule = cf.rules.build("wm", model, num_classes=3, mirror_every=3)
    B0 = rule.layers[0].feedback.clone()
    for _ in range(2):
        rule.step(*batch(model.input_shape))
    assert torch.equal(rule.layers[0].feedback, B0)
    twin = cf.rules.build("wm", tiny_mlp(), num_classes=3, mirror_every=3)
    twin.load_state_dict(rule.state_dict())
    assert twin.steps == 2
    twin.step(*batch(model.input_shape))  # the third step: mirror
    assert not torch.equal(twin.layers[0].feedback, B0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_wm_with_B_equal_to_W_is_bp_on_a_cnn(batch_norm):
    model = tiny_cnn(batch_norm=batch_norm)
    x, y = batch(model.input_shape)
    ref = bp_grads(copy.deepcopy(model), x, y)
    rule = cf.rules.build("wm", model, num_classes=3)
    assert not torch.equal(rule.layers[0].feedback, rule.layers[0].weight)
    with torch.no_grad():
        for layer in rule.layers:
            layer.feedback.copy_(layer.weight)
    rule.step(x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], msg=k)


def test_feedback_is_a_mutable_buffer_not_trained():
    rule = cf.rules.build("wm", tiny_cnn(), num_classes=3)
    trained = {id(p) for p in rule.trainable_parameters()}
    assert not any(id(layer.feedback) in trained for layer in rule.layers)
    assert rule.mutable_buffers == ("feedback",)


@pytest.mark.parametrize("option", [{"mirror_lr": 0}, {"mirror_noise": -1}, {"mirror_decay": 1.0},
                                    {"mirror_batch": 0}, {"mirror_every": 1.5}])
def test_bad_mirror_options_are_clear_errors(option):
    with pytest.raises(ValueError, match="mirror_"):
        cf.rules.build("wm", tiny_mlp(), num_classes=3, **option)
