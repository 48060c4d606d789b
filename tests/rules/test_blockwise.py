"""Block-wise direct feedback on ResNets (Launay et al. 2020): one residual block per cut.

Each BasicBlock's input is detached; the block back-propagates its injected signal through its
own conv-bn-relu-conv-bn and shortcut paths (BatchNorm included), and nothing crosses a block
boundary. References are built from a copy of the model taken before the rule's step, with
autograd run block by block, so the rule's fused backward is checked against per-block VJPs.
"""

import copy

import pytest
import torch
from torch.nn import functional as F

import creditflow as cf
from creditflow.registry import RULES

C = 5


def tiny_resnet(name="resnet18", seed=0):
    torch.manual_seed(seed)
    model = cf.models.build(name, width=4, input_shape=(3, 8, 8), num_classes=C).double()
    return model.train()


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def reference_grads(model, x, y, matrices):
    """Per-block VJPs of the DFA signals at detached block inputs, one forward in train mode."""
    blocks = list(model)
    outputs, h = [], x
    for block in blocks[:-1]:
        h = block(h.detach())  # h_i from h_{i-1}, cut
        outputs.append(h)
    logits = blocks[-1](h.detach())
    e = (logits.softmax(-1) - F.one_hot(y, C).double()).detach() / len(y)  # dL/dlogits, mean CE
    signals = [(e @ B).view_as(h) for B, h in zip(matrices, outputs)]
    grads = []
    for block, out, s in zip(blocks, [*outputs, logits], [*signals, e]):
        grads.append(torch.autograd.grad(out, list(block.parameters()), s))
    return grads, logits.detach()


@pytest.mark.parametrize("name", ["resnet18", "resnet18-nsc"])
def test_each_block_backpropagates_its_own_signal(name):
    model = tiny_resnet(name)
    x, y = batch()
    rule = cf.rules.build("dfa", model, num_classes=C, seed=3)
    ref = copy.deepcopy(model)  # before the step: BatchNorm statistics move during its forward
    ref_grads, ref_logits = reference_grads(ref, x, y, rule.feedback.matrices)
    out = rule.step(x, y)
    torch.testing.assert_close(out.logits, ref_logits)
    for i, (block, grads) in enumerate(zip(model, ref_grads)):
        for (k, p), g in zip(block.named_parameters(), grads):
            assert p.grad is not None, f"block {i} {k} got no gradient"
            torch.testing.assert_close(p.grad, g, msg=lambda m: f"block {i} {k}: {m}")
    # One forward in train mode: the running statistics moved exactly as the reference's did.
    for (k, b), r in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, msg=lambda m: f"buffer {k}: {m}")
    assert model[1].bn1.num_batches_tracked.item() == 1


@pytest.mark.parametrize("j", [0, 3, 8])  # stem, a block with a 1x1-conv shortcut, the last hidden block
def test_no_gradient_crosses_a_block_boundary(j):
    model = tiny_resnet()
    rule = cf.rules.build("dfa", model, num_classes=C, seed=3)
    for i, B in enumerate(rule.feedback.matrices):
        if i != j:
            B.zero_()
    rule.step(*batch())
    for i, block in enumerate(model):
        nonzero = {k: bool(p.grad is not None and torch.count_nonzero(p.grad) > 0)
                   for k, p in block.named_parameters()}
        if i in (j, len(model) - 1):  # block j from its signal; the head from e
            assert all(nonzero.values()), f"block {i}: {nonzero}"
        else:
            assert not any(nonzero.values()), f"block {i} received a gradient from block {j}: {nonzero}"
    if j == 3:
        assert torch.count_nonzero(model[3].shortcut[0].weight.grad) > 0  # the skip path learns too


def test_head_learns_as_in_bp_and_blocks_do_not():
    # Same weights and batch: the head gets e as in BP; a hidden block gets B_i e instead.
    model = tiny_resnet()
    x, y = batch()
    bp = cf.rules.build("bp", copy.deepcopy(model), num_classes=C)
    bp.step(x, y)
    cf.rules.build("dfa", model, num_classes=C, seed=3).step(x, y)
    assert not torch.allclose(model[1].conv1.weight.grad, bp.model[1].conv1.weight.grad)
    torch.testing.assert_close(model[-1][-1].weight.grad, bp.model[-1][-1].weight.grad)


@pytest.mark.parametrize("model_name", ["resnet18", "resnet18-nsc"])
@pytest.mark.parametrize("rule_name", cf.rules.available())
def test_every_rule_trains_a_resnet(rule_name, model_name):
    model = tiny_resnet(model_name)
    refusal = RULES.get(rule_name).builder.model_refusal(model)  # DTP: MLPs only; AL: folded nets only
    if refusal:
        with pytest.raises(ValueError, match=f"rule '{rule_name}' (needs an MLP|needs a folded)"):
            cf.rules.build(rule_name, model, num_classes=C)
        return
    rule = cf.rules.build(rule_name, model, num_classes=C)
    params = list(rule.trainable_parameters())
    assert params
    out = rule.step(*batch())
    assert out.logits.shape == (4, C) and torch.isfinite(out.loss)
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
