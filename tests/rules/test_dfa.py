import copy

import pytest
import torch

import creditflow as cf
from tests.reference import (
    batch,
    bp_grads,
    mlp_direct_grads,
    output_error,
    tiny_cnn,
    tiny_mlp,
)


def test_dfa_with_one_hidden_block_and_B_equal_to_W_out_is_bp():
    model = tiny_mlp(dims=(6, 5, 3))
    x, y = batch(model.input_shape)
    ref = bp_grads(copy.deepcopy(model), x, y)
    rule = cf.rules.build("dfa", model, num_classes=3)
    rule.feedback.matrices[0].copy_(model.head.weight)  # (C, n): signal e @ W_out = W_out^T e
    rule.step(x, y)
    for k, p in model.named_parameters():
        if k in ref:
            torch.testing.assert_close(p.grad, ref[k])
        else:
            assert p.grad is None


def test_dfa_matches_hand_derived_update():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    x, y = batch(model.input_shape)
    rule = cf.rules.build("dfa", model, num_classes=3, feedback_scale=2.0, seed=5)
    linears = [model[0][0], model[1][0], model[2]]
    gW, gb = mlp_direct_grads([m.weight.detach() for m in linears], [m.bias.detach() for m in linears],
                              x, y, rule.feedback.matrices)
    rule.step(x, y)
    for m, w, b in zip(linears, gW, gb):
        torch.testing.assert_close(m.weight.grad, w)
        torch.testing.assert_close(m.bias.grad, b)
    assert model[0].unused.grad is None


def test_dfa_blocks_learn_only_from_their_own_signal():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    rule = cf.rules.build("dfa", model, num_classes=3)
    rule.feedback.matrices[0].zero_()  # block 0 gets a zero signal; block 1 still learns
    rule.step(*batch(model.input_shape))
    assert torch.count_nonzero(model[0][0].weight.grad) == 0  # nothing leaked down from block 1
    assert torch.count_nonzero(model[1][0].weight.grad) > 0


def test_dfa_conv_block_gets_B_e_in_its_output_shape():
    model = tiny_cnn()
    x, y = batch(model.input_shape)
    rule = cf.rules.build("dfa", model, num_classes=3, seed=0)
    assert [tuple(s) for s in rule.feedback.shapes] == [(3, 4, 4), (4, 2, 2), (5,)]
    ref_model = copy.deepcopy(model)
    rule.step(x, y)
    # Reference: each block's own VJP of its signal, at the same detached block input.
    h0 = ref_model[0](x)
    h1 = ref_model[1](h0.detach())
    h2 = ref_model[2](h1.detach())
    logits = ref_model[3](h2.detach())
    err = output_error(logits.detach(), y)
    s1 = (err @ rule.feedback.matrices[1]).view_as(h1)
    (gW1,) = torch.autograd.grad(h1, ref_model[1][0].weight, s1)
    torch.testing.assert_close(model[1][0].weight.grad, gW1)
    s0 = (err @ rule.feedback.matrices[0]).view_as(h0)
    (gW0,) = torch.autograd.grad(h0, ref_model[0][0].weight, s0)
    torch.testing.assert_close(model[0][0].weight.grad, gW0)


def test_dfa_differs_from_bp_with_random_feedback():
    model = tiny_mlp()
    x, y = batch(model.input_shape)
    ref = bp_grads(copy.deepcopy(model), x, y)
    cf.rules.build("dfa", model, num_classes=3).step(x, y)
    assert not torch.allclose(model[0][0].weight.grad, ref["0.0.weight"])
    torch.testing.assert_close(model[2].weight.grad, ref["2.weight"])  # the head is trained as in BP


def test_product_init_is_the_downstream_weight_product():
    model = tiny_mlp(dims=(6, 5, 4, 3))
    rule = cf.rules.build("dfa", model, num_classes=3, feedback_init="product")
    W1, W2 = model[1][0].weight, model[2].weight
    torch.testing.assert_close(rule.feedback.matrices[0], W2 @ W1)
    torch.testing.assert_close(rule.feedback.matrices[1], W2)
    assert rule.feedback.matrices[1].data_ptr() != W2.data_ptr()
    pairs = rule.feedback_pairs()
    assert set(pairs) == {"block0", "block1"}
    torch.testing.assert_close(pairs["block0"][0], pairs["block0"][1])


def test_product_init_on_a_linear_net_makes_dfa_equal_bp():
    torch.manual_seed(0)
    from torch import nn
    model = cf.models.BlockNet([nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)], (6,)).double()
    x, y = batch((6,))
    ref = bp_grads(copy.deepcopy(model), x, y)
    cf.rules.build("dfa", model, num_classes=3, feedback_init="product").step(x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k])


def test_product_init_rejects_conv_models_clearly():
    with pytest.raises(ValueError, match="needs fully connected blocks downstream, found Conv2d"):
        cf.rules.build("dfa", tiny_cnn(), num_classes=3, feedback_init="product")
    with pytest.raises(ValueError, match="unknown feedback_init 'ones'; available: random, product"):
        cf.rules.build("dfa", tiny_mlp(), num_classes=3, feedback_init="ones")
