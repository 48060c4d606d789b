"""Difference target propagation against a hand computation of Lee et al. 2015, Algorithm 1."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import creditflow as cf
from creditflow.models import BlockNet
from creditflow.train.config import RunConfig
from creditflow.train.trainer import build_run
from tests.reference import batch, tiny_cnn, tiny_mlp


def tanh_mlp(dims=(5, 4, 4, 3, 3), seed=0) -> BlockNet:
    """Three tanh hidden blocks (two inverses, so the difference correction runs twice); block 0
    carries one parameter the forward never uses."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(dims[:-2], dims[1:-1])]
    blocks.append(nn.Linear(dims[-2], dims[-1]))
    blocks[0].register_parameter("unused", nn.Parameter(torch.ones(2)))
    return BlockNet(blocks, (dims[0],)).double()


def grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def test_dtp_matches_a_hand_computation():
    model = tanh_mlp()
    x, y = batch(model.input_shape)  # (7, 5), 3 classes
    eta, sigma, N = 0.5, 0.3, len(x)
    rule = cf.rules.build("dtp", model, num_classes=3, target_lr=eta, noise=sigma)
    with torch.no_grad():  # non-zero biases, so the bias terms are checked too
        for g in rule.inverse:
            g[0].bias.normal_()
    W = [model[i][0].weight.detach().clone() for i in range(3)] + [model[3].weight.detach().clone()]
    b = [model[i][0].bias.detach().clone() for i in range(3)] + [model[3].bias.detach().clone()]
    V = {i: rule.inverse[i - 2][0].weight.detach().clone() for i in (2, 3)}  # g_i: h_i -> h_{i-1}
    c = {i: rule.inverse[i - 2][0].bias.detach().clone() for i in (2, 3)}
    torch.manual_seed(11)
    rule.step(x, y)

    # Forward: h_i = tanh(W_i h_{i-1} + b_i), logits = W_4 h_3 + b_4.
    h = [x]
    for i in range(3):
        h.append(torch.tanh(h[-1] @ W[i].T + b[i]))
    logits = h[3] @ W[3].T + b[3]
    e = (logits.softmax(-1) - F.one_hot(y, 3).double()) / N  # dL/dlogits, mean cross-entropy
    torch.testing.assert_close(model[3].weight.grad, e.T @ h[3])  # the head: the true gradient
    torch.testing.assert_close(model[3].bias.grad, e.sum(0))
    # Targets: top by the loss gradient, then the difference correction through g_3, g_2.
    def g(i, v):
        return torch.tanh(v @ V[i].T + c[i])

    t = {3: h[3] - eta * (e @ W[3])}
    t[2] = h[2] + g(3, t[3]) - g(3, h[3])
    t[1] = h[1] + g(2, t[2]) - g(2, h[2])
    for i in (1, 2, 3):
        torch.testing.assert_close(rule.targets[i - 1], t[i])
        # Layer loss mean_n ||h_i - t_i||^2 -> delta_i = 2 (h_i - t_i) * tanh'(a_i) / N.
        delta = 2 * (h[i] - t[i]) * (1 - h[i] ** 2) / N
        torch.testing.assert_close(model[i - 1][0].weight.grad, delta.T @ h[i - 1])
        torch.testing.assert_close(model[i - 1][0].bias.grad, delta.sum(0))
    # Inverse losses with the same noise: eps drawn for layer 2 (shape of h_1), then layer 3.
    torch.manual_seed(11)
    eps = {2: torch.randn(N, 4, dtype=torch.float64), 3: torch.randn(N, 4, dtype=torch.float64)}
    metrics = rule.step_metrics()
    for i in (2, 3):
        corrupt = h[i - 1] + sigma * eps[i]
        fc = torch.tanh(corrupt @ W[i - 1].T + b[i - 1])
        r = g(i, fc)
        d = 2 * (r - corrupt) * (1 - r ** 2) / N
        torch.testing.assert_close(rule.inverse[i - 2][0].weight.grad, d.T @ fc)
        torch.testing.assert_close(rule.inverse[i - 2][0].bias.grad, d.sum(0))
        torch.testing.assert_close(metrics[f"inverse_loss/{i}"], (r - corrupt).pow(2).sum(-1).mean())
    for i in (1, 2, 3):
        torch.testing.assert_close(metrics[f"target_loss/{i}"], (h[i] - t[i]).pow(2).sum(-1).mean())
    assert sorted(metrics) == ["inverse_loss/2", "inverse_loss/3", "target_loss/1", "target_loss/2", "target_loss/3"]
    assert all(not v.requires_grad and v.ndim == 0 for v in metrics.values())
    assert model[0].unused.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_each_gradient_is_autograd_of_its_own_local_loss(reduction):
    model = tiny_mlp(dims=(6, 5, 4, 4, 3))  # ReLU, three hidden blocks
    x, y = batch(model.input_shape)
    reference = copy.deepcopy(model)
    rule = cf.rules.build("dtp", model, num_classes=3, reduction=reduction, inverse_activation="sigmoid")
    inverses = copy.deepcopy(rule.inverse)
    torch.manual_seed(5)
    rule.step(x, y)
    reduce = torch.mean if reduction == "mean" else torch.sum
    blocks = list(reference.children())
    h = [x]
    for block in blocks[:-1]:
        h.append(block(h[-1]).detach())
    for i, (block, target) in enumerate(zip(blocks[:-1], rule.targets)):  # ||f_i(h_{i-1}) - t_i||^2
        params = [p for _, p in block.named_parameters() if p is not getattr(block, "unused", None)]
        ref = torch.autograd.grad(reduce((block(h[i]) - target).pow(2).sum(-1)), params)
        for p, r in zip([p for n, p in model[i].named_parameters() if n != "unused"], ref):
            torch.testing.assert_close(p.grad, r)
    head_ref = torch.autograd.grad(F.cross_entropy(blocks[-1](h[-1]), y), list(blocks[-1].parameters()))
    for p, r in zip(model[-1].parameters(), head_ref):
        torch.testing.assert_close(p.grad, r)
    torch.manual_seed(5)
    for j, g in enumerate(inverses):  # g_{j+2}: ||g(f(h + eps)) - (h + eps)||^2, f fixed
        corrupt = h[j + 1] + 0.36 * torch.randn_like(h[j + 1])
        ref = torch.autograd.grad(reduce((g(blocks[j + 1](corrupt).detach()) - corrupt).pow(2).sum(-1)),
                                  list(g.parameters()))
        for p, r in zip(rule.inverse[j].parameters(), ref):
            torch.testing.assert_close(p.grad, r)


def test_forward_weights_get_nothing_from_inverse_losses_and_inverses_nothing_from_targets():
    model = tanh_mlp()
    x, y = batch(model.input_shape)
    base = cf.rules.build("dtp", model, num_classes=3)
    runs = {}
    for name, seed, eta in (("base", 0, 0.327), ("other_noise", 1, 0.327), ("other_eta", 0, 2.0)):
        rule = copy.deepcopy(base)
        rule.target_lr = eta
        torch.manual_seed(seed)
        rule.step(x, y)
        runs[name] = (grads(rule.model), grads(rule.inverse))
    fwd, inv = runs["base"]
    # The noise enters only the inverse losses: forward gradients do not move with it.
    assert all(torch.equal(fwd[k], v) for k, v in runs["other_noise"][0].items())
    assert not all(torch.equal(inv[k], v) for k, v in runs["other_noise"][1].items())
    # The targets enter only the layer losses: inverse gradients do not move with eta.
    assert all(torch.equal(inv[k], v) for k, v in runs["other_eta"][1].items())
    assert not torch.allclose(fwd["0.0.weight"], runs["other_eta"][0]["0.0.weight"])
    # With eta -> 0 the targets equal the activities: hidden blocks get exactly zero.
    rule = copy.deepcopy(base)
    rule.target_lr = 0.0
    rule.step(x, y)
    assert all(torch.count_nonzero(rule.model[i][0].weight.grad) == 0 for i in range(3))
    assert all(torch.count_nonzero(g[0].weight.grad) > 0 for g in rule.inverse)


def test_noise_is_reproducible_with_a_fixed_seed():
    model = tanh_mlp()
    x, y = batch(model.input_shape)
    base = cf.rules.build("dtp", model, num_classes=3)
    rules = [copy.deepcopy(base) for _ in range(3)]  # one build: the inverses' init draws from the RNG too
    for rule, seed in zip(rules, (4, 4, 5)):
        torch.manual_seed(seed)
        rule.step(x, y)
    same, other = grads(rules[1].inverse), grads(rules[2].inverse)
    for k, v in grads(rules[0].inverse).items():
        assert torch.equal(v, same[k])
    assert not torch.equal(rules[0].inverse[0][0].weight.grad, other["0.0.weight"])


def test_inverse_first_steps_the_inverses_before_forming_targets():
    model = tanh_mlp()
    x, y = batch(model.input_shape)
    late = cf.rules.build("dtp", copy.deepcopy(model), num_classes=3)
    early = cf.rules.build("dtp", model, num_classes=3, inverse_first=True, inverse_lr=0.1)
    early.inverse.load_state_dict(late.inverse.state_dict())
    assert not any(p is q for p in early.trainable_parameters() for q in early.inverse.parameters())
    assert len(late.trainable_parameters()) == len(early.trainable_parameters()) + 4
    torch.manual_seed(2)
    late.step(x, y)  # same noise: its inverse gradients are the ones the early rule steps with
    torch.manual_seed(2)
    early.step(x, y)
    for p, q in zip(early.inverse.parameters(), late.inverse.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad)
        assert p.grad is None
    # Targets come from the updated inverses.
    with torch.no_grad():
        g3, h2 = early.inverse[1], model[1](model[0](x))
        torch.testing.assert_close(early.targets[1], h2 + g3(early.targets[2]) - g3(model[2](h2)))


def test_local_lr_reaches_the_inverses():
    rule = cf.rules.build("dtp", tiny_mlp(), num_classes=3)
    groups = rule.param_groups(local_lr=0.5)
    assert groups[1]["lr"] == 0.5
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in rule.inverse.parameters()}
    cfg = RunConfig(rule="dtp", model="mlp:6-5-4-3", lr=1e-3, local_lr=0.25, device="cpu")
    rule, opt, _ = build_run(cfg, SimpleNamespace(shape=(6,), num_classes=3), torch.device("cpu"))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.25]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in rule.inverse.parameters()}


def test_one_hidden_block_needs_no_inverse():
    model = tiny_mlp(dims=(6, 5, 3))
    rule = cf.rules.build("dtp", model, num_classes=3)
    assert len(rule.inverse) == 0 and rule.local_parameters() == []
    x, y = batch(model.input_shape)
    rule.step(x, y)
    assert sorted(rule.step_metrics()) == ["target_loss/1"]
    assert torch.count_nonzero(model[0][0].weight.grad) > 0


def test_bad_options_and_models_are_rejected():
    build = lambda **kw: cf.rules.build("dtp", tiny_mlp(), num_classes=3, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="need target_lr > 0"):
        build(target_lr=0)
    with pytest.raises(ValueError, match="noise >= 0"):
        build(noise=-0.1)
    with pytest.raises(ValueError, match="unknown inverse_activation 'softmax'; available: tanh, sigmoid"):
        build(inverse_activation="softmax")
    with pytest.raises(ValueError, match="unknown reduction 'max'; available: mean, sum"):
        build(reduction="max")
    with pytest.raises(ValueError, match="bad options for rule 'dtp'"):
        build(eta=1)
    with pytest.raises(ValueError, match="rule 'dtp' needs an MLP: .* got a Conv2d"):
        cf.rules.build("dtp", tiny_cnn(), num_classes=3)
    bn = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="got a BatchNorm1d"):
        cf.rules.build("dtp", bn, num_classes=2)
