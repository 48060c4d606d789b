"""Any loss, any output: a user's loss on a classifier, a regression output (N, D), a language
model's (N, T, V); references written from the DFA equations with ``e`` from autograd."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import creditflow as cf
from creditflow.registry import RULES as REGISTRY
from tests.reference import batch, mlp_direct_grads, tiny_mlp


def test_dfa_with_a_users_loss_equals_the_dfa_equations_with_e_from_autograd():
    model = tiny_mlp(unused_parameter=False)
    rule = cf.rules.build("dfa", model, num_classes=3)
    x, y = batch(model.input_shape)
    Ws = [model[0][0].weight.detach(), model[1][0].weight.detach(), model[2].weight.detach()]
    bs = [model[0][0].bias.detach(), model[1][0].bias.detach(), model[2].bias.detach()]

    def smoothed(logits):  # the user's loss: cross-entropy with label smoothing 0.1
        return F.cross_entropy(logits, y, label_smoothing=0.1)

    def error(logits):  # e = dL/dlogits, by autograd on the user's loss
        z = logits.detach().requires_grad_()
        (e,) = torch.autograd.grad(smoothed(z), z)
        return e

    gW, gb = mlp_direct_grads(Ws, bs, x, y, rule.feedback.matrices, error)
    rule.backward(smoothed(rule(x)))
    for W, b, (name, layer) in zip(gW, gb, [("0", model[0][0]), ("1", model[1][0]), ("head", model[2])]):
        torch.testing.assert_close(layer.weight.grad, W, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(layer.bias.grad, b, rtol=1e-12, atol=1e-12, msg=name)


def regression_mlp(seed=0):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(3, 16), nn.Tanh()), nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
              nn.Linear(16, 2)]
    return cf.models.BlockNet(blocks, (3,)).double()


# A regression output (N, 2) and an MSE loss: every rule whose update is the output error's (no
# class target) runs in a plain loop; DFA's gradients are its equations'.
REGRESSION_RULES = [n for n in cf.rules.available() if not REGISTRY.get(n).builder.needs_target
                    and REGISTRY.get(n).builder.model_refusal(regression_mlp()) is None]


@pytest.mark.parametrize("name", REGRESSION_RULES)
def test_every_rule_without_a_class_target_trains_a_regression_output(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    target = torch.stack([x[:, 0] * x[:, 1], torch.sin(2 * x[:, 2])], 1)  # (N, 2)
    rule = cf.rules.build(name, regression_mlp(), num_classes=2)
    opt = torch.optim.Adam(rule.param_groups(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(rule(x), target)
        rule.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_regression_dfa_is_the_dfa_equations():
    model = regression_mlp()
    rule = cf.rules.build("dfa", model, num_classes=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.randn(5, 2, dtype=torch.float64)
    rule.backward(F.mse_loss(rule(x), t))
    h1 = torch.tanh(x @ model[0][0].weight.T + model[0][0].bias)
    h2 = torch.tanh(h1 @ model[1][0].weight.T + model[1][0].bias)
    out = h2 @ model[2].weight.T + model[2].bias
    e = 2 * (out - t) / out.numel()  # d mean((out - t)^2) / d out
    B1, B2 = rule.feedback.matrices
    d2 = (e @ B2) * (1 - h2 ** 2)  # delta_i = (B_i e) * f'(a_i)
    d1 = (e @ B1) * (1 - h1 ** 2)
    torch.testing.assert_close(model[2].weight.grad, e.T @ h2)
    torch.testing.assert_close(model[1][0].weight.grad, d2.T @ h1)
    torch.testing.assert_close(model[0][0].weight.grad, d1.T @ x)


# -- a tiny causal Transformer language model ----------------------------------------------------


class Embed(nn.Module):
    """Token + position embedding: (N, T) ids -> (N, T, D)."""

    def __init__(self, vocab, dim, context):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)

    def forward(self, ids):
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))


class CausalBlock(nn.Module):
    """Pre-norm causal self-attention + MLP, with nn.Linear projections (so FA-type rules see them)."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h):
        n, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(n, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return h + self.mlp(self.norm2(h))


class Head(nn.Module):
    def __init__(self, dim, vocab):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, h):
        return self.out(self.norm(h))


def tiny_lm(vocab, dim=32, context=16, layers=2, seed=0):
    torch.manual_seed(seed)
    blocks = [Embed(vocab, dim, context), *(CausalBlock(dim) for _ in range(layers)), Head(dim, vocab)]
    return cf.models.BlockNet(blocks, (context,))


def text_batches(context=16, n=32, seed=0):
    """A text the test makes: words of a tiny grammar; next-token prediction batches (N, T)."""
    words = ["the cat sat", "a dog ran", "the dog sat", "a cat ran"]
    g = torch.Generator().manual_seed(seed)
    text = " . ".join(words[i] for i in torch.randint(0, len(words), (400,), generator=g).tolist())
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    starts = torch.randint(0, len(ids) - context - 1, (200, n), generator=g)
    return len(vocab), [(ids[s[:, None] + torch.arange(context)], ids[s[:, None] + torch.arange(1, context + 1)])
                        for s in starts]


def lm_loss(logits, targets):  # (N, T, V) against (N, T)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_a_language_model_trains_with_dfa_and_with_bp_side_by_side():
    vocab, batches = text_batches()
    rules = {name: cf.rules.build(name, tiny_lm(vocab), num_classes=vocab) for name in ("bp", "dfa")}
    opts = {name: torch.optim.Adam(rule.parameters(), lr=3e-3) for name, rule in rules.items()}
    first, last = {}, {}
    for step, (ids, nxt) in enumerate(batches[:120]):
        for name, rule in rules.items():
            loss = lm_loss(rule(ids), nxt)
            rule.backward(loss)
            opts[name].step()
            opts[name].zero_grad()
            first.setdefault(name, loss.item())
            last[name] = loss.item()
    # ln(vocab) at chance; the grammar's next character is mostly determined
    assert first["dfa"] > 0.8 * math.log(vocab)
    assert last["bp"] < 0.5 * first["bp"] and last["dfa"] < 0.7 * first["dfa"], (first, last)


def test_dfa_on_a_sequence_output_is_the_per_position_projection():
    """Embedding -> token MLP block -> head, outputs (N, T, V): block i gets ``e_t @ B_i`` at every
    position t, with one (V, D) matrix per block (the error is not flattened over positions)."""
    torch.manual_seed(0)
    V, D, T = 5, 4, 3
    emb = nn.Embedding(V, D)
    block = nn.Sequential(nn.Linear(D, D), nn.Tanh())
    head = nn.Linear(D, V)
    model = cf.models.BlockNet([emb, block, head], (T,)).double()
    rule = cf.rules.build("dfa", model, num_classes=V)
    B0, B1 = rule.feedback.matrices
    assert B0.shape == (V, D) and B1.shape == (V, D)
    ids = torch.randint(0, V, (2, T))
    nxt = torch.randint(0, V, (2, T))
    rule.backward(lm_loss(rule(ids), nxt))
    with torch.no_grad():
        a = emb.weight[ids]  # (N, T, D)
        h = torch.tanh(a @ block[0].weight.T + block[0].bias)
        logits = h @ head.weight.T + head.bias
        e = (logits.softmax(-1) - F.one_hot(nxt, V).double()) / nxt.numel()  # (N, T, V)
        delta = (e @ B1) * (1 - h ** 2)  # per position
        ref_W1 = torch.einsum("ntd,nte->de", delta, a)
        ref_E = torch.zeros(V, D, dtype=torch.float64).index_add_(0, ids.flatten(), (e @ B0).flatten(0, 1))
        ref_H = torch.einsum("ntv,ntd->vd", e, h)
    torch.testing.assert_close(head.weight.grad, ref_H)
    torch.testing.assert_close(block[0].weight.grad, ref_W1)
    torch.testing.assert_close(emb.weight.grad, ref_E)


@pytest.mark.parametrize("name", ["las", "ltas", "drtp", "local"])
def test_rules_that_need_one_output_per_sample_say_so(name):
    with pytest.raises(ValueError, match=r"needs one output vector per sample \(N, C\); this model outputs "
                                         r"\(N, 16, C\): dfa and shallow take outputs with positions"):
        cf.rules.build(name, tiny_lm(7), num_classes=7)
