import torch

from creditflow.mechanisms import inject, run_cut
from tests.reference import tiny_mlp


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
