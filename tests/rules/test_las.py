import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import creditflow as cf
from creditflow.mechanisms import ConvLocal, LinearLocal
from tests.reference import batch, bp_grads, output_error, tiny_cnn, tiny_mlp


def linear_net(dims=(8, 6, 5, 3), seed=0, bias=True):
    torch.manual_seed(seed)
    blocks = [nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])]
    return cf.models.BlockNet(blocks, (dims[0],)).double()


@pytest.mark.parametrize("name", ["las", "ltas"])
def test_local_modules_at_the_exact_downstream_jacobian_make_las_bp(name):
    model = linear_net()  # 2 hidden layers: block 0 gets B e, block 1 gets W_L^T e
    x, y = batch((8,))
    ref = bp_grads(copy.deepcopy(model), x, y)
    rule = cf.rules.build(name, model, num_classes=3)
    with torch.no_grad():
        rule.local[0].weight.copy_(model[2].weight @ model[1].weight)  # d a_L / d h_1
    rule.step(x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k])


def test_las_module_converges_to_the_downstream_product_on_a_linear_net():
    model = linear_net(dims=(8, 6, 5, 3), seed=1, bias=False)  # eq. 28: a_L = W_L ... W_2 h_1
    rule = cf.rules.build("las", model, num_classes=3)
    opt = torch.optim.Adam(rule.local_parameters(), lr=0.05)  # forward weights stay fixed
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        rule.step(torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g))
        opt.step()
        rule.zero_grad(set_to_none=True)
    learned = rule.local[0].weight.detach()
    target = model[2].weight @ model[1].weight
    assert F.cosine_similarity(learned.flatten(), target.detach().flatten(), dim=0) > 0.999
    angle = rule.feedback_pairs()["block0"]
    assert F.cosine_similarity(angle[0].flatten(), angle[1].flatten(), dim=0) > 0.999


def test_las_matches_hand_derived_update():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    ref_model = copy.deepcopy(model)
    rule = cf.rules.build("las", model, num_classes=3)
    B = rule.local[0].weight.detach().clone()  # (C, n_1)
    rule.step(x, y)
    # Reference from the LAS equations, by hand on the same weights.
    W1, b1 = ref_model[0][0].weight, ref_model[0][0].bias
    a1 = x @ W1.T + b1
    h1 = a1.clamp_min(0)
    logits = ref_model[2](ref_model[1](h1))
    e = output_error(logits.detach(), y)
    delta1 = (e @ B) * (a1 > 0).double()  # eq. 24
    torch.testing.assert_close(model[0][0].weight.grad, delta1.T @ x)
    torch.testing.assert_close(model[0][0].bias.grad, delta1.sum(0))
    # Last hidden block and head: BP from e (eq. 23).
    top = bp_grads(nn.Sequential(ref_model[1], ref_model[2]), h1.detach(), y)
    torch.testing.assert_close(model[1][0].weight.grad, top["0.0.weight"])
    torch.testing.assert_close(model[2].weight.grad, top["1.weight"])
    # Module: Algorithm 1 line 13's update h_1 (y_1 - a_L)^T (descending), averaged over the batch:
    # the gradient of local_scale * ||B h_1 - a_L||^2 with the default local_scale = 1/2.
    y1 = h1.detach() @ B.T
    torch.testing.assert_close(rule.local[0].weight.grad, (y1 - logits.detach()).T @ h1.detach() / len(x))
    eq20 = cf.rules.build("las", copy.deepcopy(ref_model), num_classes=3, local_scale=1.0)  # eq. 20 as printed
    eq20.local[0].weight.data.copy_(B)
    eq20.step(x, y)
    torch.testing.assert_close(eq20.local[0].weight.grad, 2 * rule.local[0].weight.grad)
    assert model[0].unused.grad is None


def test_ltas_module_learns_the_target_with_cross_entropy():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    rule = cf.rules.build("ltas", model, num_classes=3)
    module = copy.deepcopy(rule.local[0])
    h1 = model[0](x).detach()
    (ref,) = torch.autograd.grad(F.cross_entropy(module(h1), y), module.weight)  # eq. 26
    rule.step(x, y)
    torch.testing.assert_close(rule.local[0].weight.grad, ref)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_conv_local_module_feedback_is_its_autograd_vjp(pool):
    torch.manual_seed(0)
    for k in (3, 5):
        module = ConvLocal((4, 6, 5), num_classes=7, kernel_size=k, pool=pool).double()
        h = torch.randn(3, 4, 6, 5, dtype=torch.float64, requires_grad=True)
        e = torch.randn(3, 7, dtype=torch.float64)
        (vjp,) = torch.autograd.grad(module(h), h, e)
        torch.testing.assert_close(module.feedback(e, h.detach()), vjp)
    lin = LinearLocal((4, 2), num_classes=3).double()
    h = torch.randn(5, 4, 2, dtype=torch.float64, requires_grad=True)
    e = torch.randn(5, 3, dtype=torch.float64)
    (vjp,) = torch.autograd.grad(lin(h), h, e)
    torch.testing.assert_close(lin.feedback(e), vjp)


def test_las_on_conv_blocks_uses_conv_modules_with_the_block_kernel():
    model = tiny_cnn()
    rule = cf.rules.build("las", model, num_classes=3)
    assert [type(m).__name__ for m in rule.local] == ["ConvLocal", "ConvLocal"]
    assert rule.local[0].weight.shape == (3, 3, 3, 3)  # C planes, d_i, block's 3x3 kernel
    x, y = batch(model.input_shape)
    ref_model = copy.deepcopy(model)
    rule.step(x, y)
    h0 = ref_model[0](x)
    logits = ref_model[3](ref_model[2](ref_model[1](h0.detach())))
    e = output_error(logits.detach(), y)
    (gW,) = torch.autograd.grad(h0, ref_model[0][0].weight, rule.local[0].feedback(e))
    torch.testing.assert_close(model[0][0].weight.grad, gW)


def test_inference_never_uses_local_modules_and_param_groups_split_them():
    model = tiny_mlp(dims=(6, 5, 4, 3), unused_parameter=False)
    rule = cf.rules.build("las", model, num_classes=3)
    assert not any(m is rule.local for m in model.modules())
    groups = rule.param_groups(local_lr=0.5)
    assert len(groups) == 2 and groups[1]["lr"] == 0.5
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in rule.local.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(rule.trainable_parameters()))
    opt = torch.optim.SGD(groups, lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]


def test_las_product_init():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    rule = cf.rules.build("las", model, num_classes=3, feedback_init="product")
    torch.testing.assert_close(rule.local[0].weight.detach(), (model[2].weight @ model[1][0].weight).detach())
    with pytest.raises(ValueError, match="fully connected"):
        cf.rules.build("ltas", tiny_cnn(), num_classes=3, feedback_init="product")


def test_drtp_projects_the_target_not_the_error():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    ref_model = copy.deepcopy(model)
    rule = cf.rules.build("drtp", model, num_classes=3)
    rule.step(x, y)
    s0 = (-F.one_hot(y, 3).double() / len(y)) @ rule.feedback.matrices[0]
    h0 = ref_model[0](x)
    (gW,) = torch.autograd.grad(h0, ref_model[0][0].weight, s0)
    torch.testing.assert_close(model[0][0].weight.grad, gW)
    # Two batches with the same targets give the same block-0 update whatever the output.
    model2 = copy.deepcopy(ref_model)
    with torch.no_grad():
        model2[2].weight.mul_(-3)
    rule2 = cf.rules.build("drtp", model2, num_classes=3)
    rule2.feedback.weight.copy_(rule.feedback.weight)
    rule2.step(x, y)
    torch.testing.assert_close(model2[0][0].weight.grad, model[0][0].weight.grad)


def test_ltas_early_update_steps_the_modules_before_sending_their_feedback():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    ref_model = copy.deepcopy(model)
    rule = cf.rules.build("ltas", model, num_classes=3, update_first=True, local_lr=0.5)
    module = copy.deepcopy(rule.local[0])
    assert not any(p is q for p in rule.trainable_parameters() for q in rule.local.parameters())
    rule.step(x, y)
    h1 = ref_model[0](x)
    (g,) = torch.autograd.grad(F.cross_entropy(module(h1.detach()), y), module.weight)
    updated = module.weight.detach() - 0.5 * g  # Algorithm 2, line 5, then line 14 with the new B
    torch.testing.assert_close(rule.local[0].weight.detach(), updated)
    logits = ref_model[2](ref_model[1](h1.detach()))
    (gW,) = torch.autograd.grad(h1, ref_model[0][0].weight, output_error(logits.detach(), y) @ updated)
    torch.testing.assert_close(model[0][0].weight.grad, gW)
    assert rule.local[0].weight.grad is None


def test_las_update_first_steps_the_modules_before_forming_delta():
    """Algorithm 1, lines 13-14: B <- B - eta h_1 (y_1 - a_L)^T (descending), then delta_1 = (B e) f'(a_1)."""
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    ref_model = copy.deepcopy(model)
    rule = cf.rules.build("las", model, num_classes=3, update_first=True, local_lr=0.5)
    B = rule.local[0].weight.detach().clone()
    assert not any(p is q for p in rule.trainable_parameters() for q in rule.local.parameters())
    rule.step(x, y)
    a1 = x @ ref_model[0][0].weight.T + ref_model[0][0].bias
    h1 = a1.clamp_min(0)
    logits = ref_model[2](ref_model[1](h1)).detach()
    updated = B - 0.5 * (h1 @ B.T - logits).T @ h1 / len(x)  # line 13, averaged over the batch
    torch.testing.assert_close(rule.local[0].weight.detach(), updated)
    delta1 = (output_error(logits, y) @ updated) * (a1 > 0).double()  # line 14, with the new B
    torch.testing.assert_close(model[0][0].weight.grad, delta1.T @ x)
    assert rule.local[0].weight.grad is None
