"""Saved-for-backward bytes: exact counts on layers whose saves we can derive by hand."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import creditflow as cf
from creditflow.diagnostics import MemoryReport, peak_memory, saved_tensor_bytes

F32 = 4


def test_linear_saves_only_its_input_when_the_input_needs_no_gradient():
    # y = x W^T + b: dL/dW = delta^T x needs x; W is needed only for dL/dx, which nobody wants.
    n, a, b = 7, 5, 3
    layer = nn.Linear(a, b)
    x = torch.randn(n, a)
    assert saved_tensor_bytes(lambda: layer(x)) == n * a * F32


def test_linear_also_saves_w_when_the_input_needs_a_gradient_and_exclude_drops_it():
    n, a, b = 7, 5, 3
    layer = nn.Linear(a, b)
    x = torch.randn(n, a, requires_grad=True)
    assert saved_tensor_bytes(lambda: layer(x)) == n * a * F32 + a * b * F32
    assert saved_tensor_bytes(lambda: layer(x), exclude=layer) == n * a * F32
    assert saved_tensor_bytes(lambda: layer(x), exclude=[layer.weight]) == n * a * F32


def test_a_storage_saved_twice_counts_once():
    # ReLU saves its output; the next Linear saves the same tensor as its input.
    n, a, b, c = 4, 6, 5, 3
    net = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    x = torch.randn(n, a)
    assert saved_tensor_bytes(lambda: net(x), exclude=net) == n * a * F32 + n * b * F32
    # A detached view shares the storage too (sin saves its input h; the Linear saves h.detach()).
    h = torch.randn(n, b, requires_grad=True)
    assert saved_tensor_bytes(lambda: (h.sin(), net[2](h.detach()))) == n * b * F32


def test_it_is_a_peak_released_tensors_stop_counting():
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    one = saved_tensor_bytes(lambda: layer(x).sum().backward())
    assert one == 4 * 5 * F32
    # Two steps one after the other: the first graph is freed by its backward.
    assert saved_tensor_bytes(lambda: [layer(x).sum().backward() for _ in range(2)]) == one

    def both_alive():
        outs = [layer(x.clone()) for _ in range(2)]  # two inputs, two graphs, alive together
        torch.autograd.backward([o.sum() for o in outs])

    assert saved_tensor_bytes(both_alive) == 2 * one


def test_no_grad_saves_nothing():
    model = cf.models.build("mlp:20-16-16-4")
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: model(torch.randn(3, 20))) == 0
    assert saved_tensor_bytes(lambda: model(torch.randn(3, 20))) > 0


def mlp_rule(name, seed=0):
    torch.manual_seed(seed)
    model = cf.models.build("mlp:784-1024-1024-10")
    return cf.rules.build(name, model, num_classes=10)


def test_rules_on_the_mlp_save_what_the_algebra_says():
    n = 16
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    logits = torch.randn(n, 10, requires_grad=True)
    loss_part = saved_tensor_bytes(lambda: F.cross_entropy(logits, y))  # log-softmax output, target
    acts = {}
    for name in ("bp", "fa", "dfa", "shallow"):
        rule = mlp_rule(name)
        acts[name] = saved_tensor_bytes(lambda: rule.step(x, y), exclude=rule)
    # BP: the input, both ReLU outputs (each also the next layer's input), the loss.
    assert acts["bp"] == n * (784 + 1024 + 1024) * F32 + loss_part
    # FA and DFA need the same activations for their weight gradients: no activation saving.
    # Direct rules compute e in closed form, so they hold no graph for the loss.
    assert acts["fa"] == acts["bp"]
    assert acts["dfa"] == acts["bp"] - loss_part
    # Shallow freezes block 1, so its input is never saved.
    assert acts["shallow"] == acts["bp"] - n * 784 * F32 - loss_part

    # Counting state too: BP saves W2 and W3 (for W^T delta); DFA cuts those products and saves no W.
    bp, dfa = mlp_rule("bp"), mlp_rule("dfa")
    total_bp = saved_tensor_bytes(lambda: bp.step(x, y))
    total_dfa = saved_tensor_bytes(lambda: dfa.step(x, y))
    assert total_dfa == acts["dfa"]
    assert total_bp - total_dfa == (1024 * 1024 + 10 * 1024) * F32 + loss_part


def test_peak_memory_on_cpu_reports_saved_bytes_and_no_device_peak():
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    report = peak_memory(lambda: layer(x), "cpu")
    assert report == MemoryReport(saved_for_backward_bytes=4 * 5 * F32, device_peak_bytes=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_sees_the_activations():
    layer = nn.Linear(256, 256).cuda()
    x = torch.randn(1024, 256, device="cuda")
    report = peak_memory(lambda: layer(x), "cuda")
    assert report.saved_for_backward_bytes == 1024 * 256 * F32
    assert report.device_peak_bytes >= 1024 * 256 * F32  # at least the output it allocates
