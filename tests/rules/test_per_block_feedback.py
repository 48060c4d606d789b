"""Learned per-block direct feedback is one small class (issue 20): a DFA whose ``B_i`` are
Parameters, one module per block, each trained to map its block's output to the logits."""

import math

import torch
from torch import nn

import creditflow as cf
from creditflow.rules import DirectRule
from creditflow.rules.base import placement
from tests.reference import batch, mlp_direct_grads, tiny_mlp


class BlockFeedback(nn.Module):
    def __init__(self, num_classes, size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, size).uniform_(-1 / math.sqrt(size), 1 / math.sqrt(size)))


class LearnedDFA(DirectRule):
    """DFA with a learned ``B_i`` per block: block i gets ``e @ B_i``; ``B_i`` learns
    ``||h_i B_i^T - a_L||^2 / 2`` (mean over the batch) on the detached output."""

    per_block_modules = ("feedback",)  # unit i owns feedback[i]: it pipelines with its block

    def __init__(self, model, num_classes, **options):
        super().__init__(model, num_classes, **options)
        self.feedback = nn.ModuleList(BlockFeedback(num_classes, math.prod(s)) for s in self.feedback_shapes()).to(**placement(model))

    def signals(self, e, target, outputs, blocks):
        return [(e @ self.feedback[i].weight).view_as(h) for i, h in zip(blocks, outputs)]

    def local_loss(self, outputs, logits, target, blocks):
        return sum(0.5 * (h.detach().flatten(1) @ self.feedback[i].weight.T - logits).pow(2).sum(-1).mean()
                   for i, h in zip(blocks, outputs))


def test_a_learned_per_block_feedback_is_one_small_class():
    model = tiny_mlp(unused_parameter=False)
    rule = LearnedDFA(model, 3)
    x, y = batch(model.input_shape)
    layers = [model[0][0], model[1][0], model[2]]
    Ws = [m.weight.detach().clone() for m in layers]
    bs = [m.bias.detach().clone() for m in layers]
    Bs = [f.weight.detach().clone() for f in rule.feedback]
    rule.step(x, y)
    gW, gb = mlp_direct_grads(Ws, bs, x, y, Bs)  # the blocks: DFA's equations with these B_i
    for m, W, b in zip(layers, gW, gb):
        torch.testing.assert_close(m.weight.grad, W)
        torch.testing.assert_close(m.bias.grad, b)
    # B_i: the gradient of its own loss, (h_i B_i^T - a_L)^T h_i / N
    h1 = torch.relu(x @ Ws[0].T + bs[0])
    h2 = torch.relu(h1 @ Ws[1].T + bs[1])
    logits = h2 @ Ws[2].T + bs[2]
    for f, B, h in zip(rule.feedback, Bs, (h1, h2)):
        torch.testing.assert_close(f.weight.grad, (h @ B.T - logits).T @ h / len(x))


def test_the_learned_feedback_trains_in_a_plain_loop():
    torch.manual_seed(0)
    model = cf.models.build("mlp:784-64-64-10")
    rule = LearnedDFA(model, 10)
    splits = cf.data.load("fashion-mnist-mini")
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for x, y in cf.data.batches(splits.train, 64, shuffle=True, generator=g):
        loss = nn.functional.cross_entropy(rule(splits.normalize(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        acc = (rule.model(splits.normalize(splits.test.images)).argmax(-1) == splits.test.labels).float().mean()
    assert acc > 0.6
