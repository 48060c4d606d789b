import copy

import pytest
import torch
from torch.nn import functional as F

import creditflow as cf
from creditflow.mechanisms import LinearLocal
from tests.reference import batch, bp_grads, tiny_cnn, tiny_mlp


def test_local_matches_hand_derived_update_on_a_tiny_mlp():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    ref = copy.deepcopy(model)
    rule = cf.rules.build("local", model, num_classes=3)
    A = [m.weight.clone() for m in rule.classifiers]  # (C, n_i), fixed
    rule.step(x, y)
    onehot = F.one_hot(y, 3).double()
    with torch.no_grad():
        h, inp = x, []
        for i in range(2):
            W, b = ref[i][0].weight, ref[i][0].bias
            a = h @ W.T + b
            e_i = ((h_i := a.clamp_min(0)) @ A[i].T).softmax(-1).sub(onehot) / len(x)  # dL_i/dz_i
            delta = (e_i @ A[i]) * (a > 0).double()  # A_i^T e_i through the block's ReLU
            torch.testing.assert_close(model[i][0].weight.grad, delta.T @ h)
            torch.testing.assert_close(model[i][0].bias.grad, delta.sum(0))
            inp.append(h)
            h = h_i
    top = bp_grads(ref[2], h, y)  # the head: BP from the global loss on h_2
    torch.testing.assert_close(model[2].weight.grad, top["weight"])
    torch.testing.assert_close(model[2].bias.grad, top["bias"])
    assert model[0].unused.grad is None


@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_each_block_gets_the_autograd_gradient_of_its_own_local_loss(pool, batch_norm):
    model = tiny_cnn(batch_norm=batch_norm)
    x, y = batch(model.input_shape)
    ref = copy.deepcopy(model)
    rule = cf.rules.build("local", model, num_classes=3, pool=pool)
    rule.step(x, y)
    h = x
    for i, A in enumerate(rule.classifiers):
        block = ref[i]
        h = block(h.detach())  # the block alone, its input cut
        params = list(block.parameters())
        grads = torch.autograd.grad(F.cross_entropy(A(h), y), params)
        for p, g in zip(model[i].parameters(), grads):
            torch.testing.assert_close(p.grad, g)


def test_no_gradient_crosses_a_block():
    model = tiny_mlp(dims=(6, 5, 4, 3), unused_parameter=False)
    x, y = batch(model.input_shape)
    other = copy.deepcopy(model)
    with torch.no_grad():  # change everything above block 0
        other[1][0].weight.mul_(-3)
        other[2].weight.add_(1)
    rules = [cf.rules.build("local", m, num_classes=3) for m in (model, other)]
    rules[1].load_state_dict({k: v for k, v in rules[0].state_dict().items() if "classifiers" in k}, strict=False)
    for r in rules:
        r.step(x, y)
    torch.testing.assert_close(model[0][0].weight.grad, other[0][0].weight.grad)
    assert not torch.allclose(model[1][0].weight.grad, other[1][0].weight.grad)


def test_classifiers_are_fixed_buffers_and_never_used_for_inference():
    model = tiny_cnn()
    rule = cf.rules.build("local", model, num_classes=3)
    assert not any(m is c for c in rule.classifiers for m in model.modules())
    assert all(not isinstance(m.weight, torch.nn.Parameter) for m in rule.classifiers)
    assert not rule.local_parameters()
    assert [m.weight.shape for m in rule.classifiers] == [(3, 3 * 4 * 4), (3, 4 * 2 * 2), (3, 5)]
    before = [m.weight.clone() for m in rule.classifiers]
    opt = torch.optim.SGD(rule.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(2):
        rule.step(*batch(model.input_shape))
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(m.weight, w) for m, w in zip(rule.classifiers, before))
    x, _ = batch(model.input_shape)
    out = model(x)
    with torch.no_grad():
        for m in rule.classifiers:
            m.weight.zero_()
    torch.testing.assert_close(model(x), out)


def test_learned_classifiers_get_the_gradient_of_their_local_loss():
    model = tiny_cnn()
    x, y = batch(model.input_shape)
    ref = copy.deepcopy(model)
    rule = cf.rules.build("local", model, num_classes=3, pool=2, learn_classifier=True)
    modules = copy.deepcopy(rule.classifiers)
    assert {id(p) for p in rule.local_parameters()} == {id(m.weight) for m in rule.classifiers}
    rule.step(x, y)
    h = x
    for i, (A, learned) in enumerate(zip(modules, rule.classifiers)):
        h = ref[i](h).detach()
        (g,) = torch.autograd.grad(F.cross_entropy(A(h), y), A.weight)
        torch.testing.assert_close(learned.weight.grad, g)


def test_pooled_linear_local_feedback_is_its_autograd_vjp():
    torch.manual_seed(0)
    for shape, k in [((3, 4, 4), 2), ((2, 5, 7), 2), ((2, 6, 6), 3)]:
        module = LinearLocal(shape, num_classes=4, pool=k).double()
        h = torch.randn(3, *shape, dtype=torch.float64, requires_grad=True)
        e = torch.randn(3, 4, dtype=torch.float64)
        (vjp,) = torch.autograd.grad(module(h), h, e)
        torch.testing.assert_close(module.feedback(e), vjp)
    with pytest.raises(ValueError, match="pool must be 1"):
        LinearLocal((5,), num_classes=3, pool=2)
