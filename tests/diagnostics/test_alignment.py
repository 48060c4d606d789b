import copy
import math

import pytest
import torch
from torch import nn

import creditflow as cf
from creditflow.diagnostics import AlignmentProbe, measure
from creditflow.diagnostics.alignment import block_cosine
from tests.reference import batch, tiny_cnn, tiny_mlp


def models():
    return [(tiny_mlp(dims=(6, 5, 4, 4, 3)), (6,)), (tiny_cnn(batch_norm=True), (2, 8, 8))]


@pytest.mark.parametrize("model,shape", models(), ids=["mlp", "cnn-bn"])
def test_bp_against_itself_is_cosine_one_in_every_block(model, shape):
    rule = cf.rules.build("bp", model, num_classes=3)
    result = measure(rule, *batch(shape))
    assert len(result.block_cosine) == len(model) - 1
    assert result.block_cosine == pytest.approx([1.0] * (len(model) - 1), abs=1e-6)
    assert result.weight_angle_deg == {}


@pytest.mark.parametrize("model,shape", models(), ids=["mlp", "cnn-bn"])
def test_fa_with_B_equal_W_is_bp(model, shape):
    rule = cf.rules.build("fa", model, num_classes=3)
    with torch.no_grad():
        for layer in rule.layers:
            layer.feedback.copy_(layer.weight)
    result = measure(rule, *batch(shape))
    assert result.block_cosine == pytest.approx([1.0] * (len(model) - 1), abs=1e-6)
    assert len(result.weight_angle_deg) == len(rule.layers)
    assert all(a == pytest.approx(0.0, abs=1e-6) for a in result.weight_angle_deg.values())


def test_dfa_with_random_feedback_is_below_one():
    rule = cf.rules.build("dfa", tiny_mlp(dims=(6, 5, 4, 4, 3)), num_classes=3)
    cos = measure(rule, *batch((6,))).block_cosine
    assert -1 < cos[0] < 1 - 1e-3  # the first block: the paper's Fig. 4
    assert -1 < cos[-1] < 1 - 1e-3  # even the last: a random B_k is not W_head
    assert all(math.isfinite(c) for c in cos)


def test_dfa_on_a_linear_net_with_product_feedback_is_bp():
    torch.manual_seed(0)
    model = cf.models.BlockNet([nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)], (6,)).double()
    rule = cf.rules.build("dfa", model, num_classes=3, feedback_init="product")
    result = measure(rule, *batch((6,)))
    assert result.block_cosine == pytest.approx([1.0, 1.0], abs=1e-6)
    assert result.weight_angle_deg == pytest.approx({"block0": 0.0, "block1": 0.0}, abs=1e-6)


def test_fa_weight_angle_is_the_hand_computed_arccos():
    model = cf.models.BlockNet([nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU()),
                                nn.Linear(2, 1, bias=False)], (2,)).double()
    rule = cf.rules.build("fa", model, num_classes=1)
    W0, B0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    W1, B1 = torch.tensor([[3.0, 4.0]]), torch.tensor([[-4.0, 3.0]])
    for layer, W, B in zip(rule.layers, (W0, W1), (B0, B1)):
        with torch.no_grad():
            layer.weight.copy_(W)
            layer.feedback.copy_(B)
    angles = measure(rule, torch.randn(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.long)).weight_angle_deg
    # <B0, W0> = 2, |B0| = sqrt(3), |W0| = sqrt(2); B1 is W1 turned by 90 degrees.
    assert angles["layer0"] == pytest.approx(math.degrees(math.acos(2 / math.sqrt(6))), abs=1e-9)
    assert angles["layer1"] == pytest.approx(90.0, abs=1e-9)


def test_measure_leaves_the_rule_untouched():
    model = tiny_cnn(batch_norm=True)
    rule = cf.rules.build("dfa", model, num_classes=3)
    x, y = batch((2, 8, 8))
    before = copy.deepcopy(rule.state_dict())  # parameters, B and BatchNorm running statistics
    rng = torch.get_rng_state()
    assert all(p.grad is None for p in rule.parameters())
    measure(rule, x, y)
    assert all(p.grad is None for p in rule.parameters())
    for k, v in rule.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert rule.training

    rule.step(x, y)  # accumulated gradients stay as they are, the very same tensors
    grads = [p.grad for p in rule.parameters()]
    values = [g.clone() for g in grads]
    measure(rule, x, y)
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(rule.parameters(), grads, values))


def test_eval_mode_is_kept_for_both_sides():
    rule = cf.rules.build("bp", tiny_cnn(batch_norm=True), num_classes=3).eval()
    assert measure(rule, *batch((2, 8, 8))).block_cosine == pytest.approx([1.0] * 3, abs=1e-6)
    assert not rule.training


def test_dropout_masks_are_the_same_for_the_rule_and_bp():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5)), nn.Linear(8, 3)]
    rule = cf.rules.build("bp", cf.models.BlockNet(blocks, (6,)).double(), num_classes=3)
    assert measure(rule, *batch((6,), n=16)).block_cosine == pytest.approx([1.0], abs=1e-6)


def test_blocks_without_a_signal_are_nan():
    rule = cf.rules.build("shallow", tiny_mlp(dims=(6, 5, 4, 4, 3)), num_classes=3)
    cos = measure(rule, *batch((6,))).block_cosine
    assert math.isnan(cos[0]) and math.isnan(cos[1])
    assert cos[2] == pytest.approx(1.0, abs=1e-6)  # the last hidden block learns by BP


def test_probe_on_a_real_step_equals_measure_and_keeps_the_step():
    model = tiny_mlp(dims=(6, 5, 4, 4, 3))
    rule = cf.rules.build("dfa", model, num_classes=3)
    twin = copy.deepcopy(rule)
    x, y = batch((6,))
    expected = measure(rule, x, y)
    with AlignmentProbe(rule) as probe:
        rule.step(x, y)
    assert probe.alignment(x, y) == expected
    with pytest.raises(RuntimeError, match="one probe per step"):
        probe.alignment(x, y)
    twin.step(x, y)
    for p, q in zip(rule.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # the probe changed nothing in the step


def test_block_cosine_is_the_mean_over_samples_and_skips_zero_vectors():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    r = torch.tensor([[1.0, 1.0], [0.0, 5.0], [1.0, 0.0]])
    assert block_cosine(s, r) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    assert math.isnan(block_cosine(None, r)) and math.isnan(block_cosine(s[2:], r[2:]))


def test_pre_activation_is_the_output_signal_masked_by_relus_derivative():
    """delta_1 = s_1 * f'(a_1) (LAS paper eq. 24): the output signals of both sides, masked by hand."""

    def dfa():
        torch.manual_seed(1)  # the same B every call
        return cf.rules.build("dfa", tiny_mlp(dims=(6, 5, 4, 4, 3)), num_classes=3)

    x, y = batch((6,))
    rule = dfa()
    with AlignmentProbe(rule) as probe:
        reference = copy.deepcopy(probe._reference)  # plain BP copy of the weights the step starts from
        rule.step(x, y)
    h, outputs = x, []
    for block in list(reference.children())[:-1]:
        h = block(h)
        h.retain_grad()
        outputs.append(h)
    rule.loss.value(reference[-1](h), y).backward()
    masks = [(o > 0).double() for o in outputs]  # ReLU'(a) = 1 exactly where the output is positive
    expected = [block_cosine(s * m, o.grad * m) for s, o, m in zip(probe.signals, outputs, masks)]
    got = measure(dfa(), x, y, at="pre-activation").block_cosine
    assert got == pytest.approx(expected, abs=1e-9)
    assert got != pytest.approx(measure(dfa(), x, y).block_cosine, abs=1e-3)  # the mask matters


def test_pre_activation_needs_blocks_ending_in_an_activation():
    model = cf.models.BlockNet([nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5)), nn.Linear(5, 3)], (6,))
    rule = cf.rules.build("bp", model.double(), num_classes=3)
    with pytest.raises(ValueError, match="block 0's output comes from none of ReLU.*use at=output"):
        measure(rule, *batch((6,)), at="pre-activation")


@pytest.mark.parametrize("spec", ["resnet18", "resnet18-nsc"])
def test_pre_activation_in_residual_blocks_is_the_input_of_the_final_relu_call(spec):
    """A BasicBlock's ReLU runs twice and an identity shortcut may be registered after it: the
    recorded tensor is the gradient at the input of the call that produced the block's output, i.e.
    the output's gradient masked by ReLU' (not the sum over both calls, not the block input's)."""
    torch.manual_seed(0)
    model = cf.models.build(spec, width=4, input_shape=(3, 8, 8), num_classes=3).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    recorded = {}
    for at in ("output", "pre-activation"):
        rule = cf.rules.build("bp", copy.deepcopy(model), num_classes=3)
        outputs = []
        hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
                 for b in list(rule.model.children())[:-1]]
        with AlignmentProbe(rule, at) as probe:
            rule.step(x, y)
        for h in hooks:
            h.remove()
        recorded[at] = probe.signals
    for g_out, g_pre, h in zip(recorded["output"], recorded["pre-activation"], outputs, strict=True):
        torch.testing.assert_close(g_pre, g_out * (h > 0))
