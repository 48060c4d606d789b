"""Hand-derived references on tiny networks, in float64, for the rule tests.

Nothing here uses creditflow's mechanisms: the updates are written out from the papers'
equations so that a rule and its reference cannot agree by accident. (The ``assert_*`` helpers
only run the rule under test and compare it with a reference.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from creditflow.models import BlockNet


def tiny_mlp(dims=(6, 5, 4, 3), seed=0, unused_parameter=True) -> BlockNet:
    """ReLU MLP in float64; block 0 carries one parameter the forward never uses."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims[:-2], dims[1:-1])]
    blocks.append(nn.Linear(dims[-2], dims[-1]))
    if unused_parameter:
        blocks[0].register_parameter("unused", nn.Parameter(torch.ones(2)))
    return BlockNet(blocks, (dims[0],)).double()


def tiny_cnn(seed=0, batch_norm=False) -> BlockNet:
    torch.manual_seed(seed)

    def conv(c_in, c_out):
        layers = [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        return nn.Sequential(*layers, nn.ReLU())

    blocks = [conv(2, 3), conv(3, 4), nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.ReLU()),
              nn.Linear(5, 3)]
    return BlockNet(blocks, (2, 8, 8)).double()


def batch(input_shape, n=7, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *input_shape, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def output_error(logits, y):
    """e = dL/da_L for mean softmax cross-entropy: (softmax - onehot) / N."""
    return (logits.softmax(-1) - F.one_hot(y, logits.shape[-1]).double()) / logits.shape[0]


def bp_grads(model, x, y) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: g for k, g in zip(params, grads) if g is not None}


def mlp_forward(weights, biases, x):
    """ReLU MLP forward: (inputs ``h_i`` of every layer, hidden pre-activations ``a_i``, logits)."""
    hs, As = [x], []
    for W, b in zip(weights[:-1], biases[:-1]):
        As.append(hs[-1] @ W.T + b)
        hs.append(As[-1].clamp_min(0))
    return hs, As, hs[-1] @ weights[-1].T + biases[-1]


def mlp_direct_grads(weights, biases, x, y, feedback, error=None):
    """Direct feedback on a ReLU MLP, from the DFA equations (Nøkland 2016, LAS eqs. 15-18).

    ``weights[i]``: (out, in); ``feedback[i]``: (C, n_i) or None, the signal of hidden layer i is
    ``e @ feedback[i]``; the head learns from e. ``error(logits)``: e = dL/dlogits of another loss
    (default: the mean cross-entropy's). Returns (grads_W, grads_b).
    """
    hs, As, logits = mlp_forward(weights, biases, x)
    e = output_error(logits, y) if error is None else error(logits)
    gW, gb = [], []
    for i, B in enumerate(feedback):
        delta = (e @ B) * (As[i] > 0).double()  # delta_i = (B_i e) * f'(a_i)
        gW.append(delta.T @ hs[i])
        gb.append(delta.sum(0))
    gW.append(e.T @ hs[-1])
    gb.append(e.sum(0))
    return gW, gb


def mlp_fa_grads(weights, biases, x, y, feedback):
    """Feedback alignment on a ReLU MLP: delta_i = (B_{i+1}^T delta_{i+1}) * f'(a_i).

    ``feedback[i]`` has the shape of ``weights[i]`` (this library's convention).
    """
    hs, As, logits = mlp_forward(weights, biases, x)
    delta = output_error(logits, y)
    gW, gb = [None] * len(weights), [None] * len(weights)
    for i in reversed(range(len(weights))):
        gW[i], gb[i] = delta.T @ hs[i], delta.sum(0)
        if i:
            delta = (delta @ feedback[i]) * (As[i - 1] > 0).double()
    return gW, gb


def assert_step_is_mlp_fa(rule, model, x, y, weights, biases, feedback):
    """``rule.step(x, y)`` on a :func:`tiny_mlp` ``model`` gives :func:`mlp_fa_grads`'s gradients
    for every layer's ``W`` and ``b`` (feedback ``feedback``), and none to block 0's unused parameter."""
    gW, gb = mlp_fa_grads(weights, biases, x, y, feedback)
    rule.step(x, y)
    for layer, w, b in zip(rule.layers, gW, gb):
        torch.testing.assert_close(layer.weight.grad, w)
        torch.testing.assert_close(layer.bias.grad, b)
    assert model[0].unused.grad is None


def tiny_associated(kind="mlp", seed=0, batch_norm=False):
    """Associated-learning twins of :func:`tiny_mlp` (``kind="mlp"``) and :func:`tiny_cnn` (``"cnn"``):
    two components (ELU encoders, 4-unit label side, 6-unit bridges), float64, 3 classes."""
    from creditflow.models.associated import (
        fold,  # a model builder, not a rule mechanism
    )

    torch.manual_seed(seed)
    if kind == "mlp":
        units, shape = [nn.Sequential(nn.Linear(6, 5), nn.ELU()), nn.Sequential(nn.Linear(5, 4), nn.ELU())], (6,)
    else:
        units = [nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                               *([nn.BatchNorm2d(c_out)] if batch_norm else []), nn.ELU())
                 for c_in, c_out in ((2, 3), (3, 4))]
        shape = (2, 8, 8)
    return fold(units, input_shape=shape, num_classes=3, width=4, bridge_width=6).double()


def needs_folded(rule_name: str) -> bool:
    """Does the rule train folded (associated-learning) models only? Read from its model refusal."""
    from creditflow.registry import RULES

    why = RULES.get(rule_name).builder.model_refusal(tiny_mlp())
    return why is not None and "folded" in why


def tiny_model_for(rule_name: str, kind: str = "mlp") -> nn.Module:
    """The tiny float64 model of ``kind`` ("mlp", or "cnn" with BatchNorm) a rule trains: its
    associated-learning twin for a rule that needs a folded model."""
    if needs_folded(rule_name):
        return tiny_associated("mlp" if kind == "mlp" else "cnn", batch_norm=kind == "cnn")
    return tiny_mlp(unused_parameter=False) if kind == "mlp" else tiny_cnn(batch_norm=True)


def rule_and_copy(rule_name: str, kind: str = "mlp", dtype: torch.dtype = torch.float64):
    """Two identical rules (one built, one deep-copied) on :func:`tiny_model_for` in ``dtype``; the
    test is skipped where the rule does not train that kind of model (DTP: MLPs only)."""
    import copy

    import pytest

    import creditflow as cf
    from creditflow.registry import RULES

    model = tiny_model_for(rule_name, kind).to(dtype)
    if RULES.get(rule_name).builder.model_refusal(model):
        pytest.skip(f"{rule_name} does not train {kind} models")
    rule = cf.rules.build(rule_name, model, num_classes=3)
    return rule, copy.deepcopy(rule)
