import torch
from torch import nn

from creditflow.mechanisms import inject, output_error, run_cut
from tests.reference import tiny_mlp


def test_output_error_is_the_loss_gradient():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0])
    loss, e = output_error(logits, y, nn.functional.cross_entropy)
    (ref,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), logits)
    torch.testing.assert_close(e, ref)
    assert not loss.requires_grad and logits.grad is None


def test_no_gradient_crosses_a_cut():
    model = tiny_mlp()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    outputs = run_cut(list(model), x)
    # Only the head receives a signal: nothing below it may get a gradient.
    inject(outputs, [None, None, torch.ones_like(outputs[-1])])
    assert x.grad is None
    assert all(p.grad is None for p in model[0].parameters())
    assert all(p.grad is None for p in model[1].parameters())
    assert model[2].weight.grad is not None


def test_one_fused_backward_equals_one_backward_per_block():
    signals = None
    grads = []
    for fused in (True, False):
        model = tiny_mlp(seed=3)
        x = torch.randn(4, 6, dtype=torch.float64)
        outputs = run_cut(list(model), x)
        if signals is None:
            signals = [torch.randn_like(h) for h in outputs]
        if fused:
            inject(outputs, signals)
        else:
            for h, s in zip(outputs, signals):
                h.backward(s)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
