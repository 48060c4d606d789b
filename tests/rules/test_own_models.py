"""Rules on models users already have: non-Sequential modules, no timm needed.

Direct rules cut a model's own forward at named module outputs (``blocks=[...]``, forward hooks);
feedback-layer rules swap every Linear/Conv2d wherever it sits. Two hand-written models stand in
for timm's: a small ResNet (stem, two residual stages, pooling + Linear in ``forward``) and a small
ViT (patch-embedding conv, class token, position embedding, attention with a fused qkv Linear,
MLP, residual adds, token tensors (N, T, D) at the block boundaries).
"""

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import creditflow as cf
from creditflow.registry import RULES
from creditflow.rules import DirectRule
from tests.reference import output_error

C = 4
DIRECT = [n for n in RULES.available() if isinstance(RULES.get(n).builder, type)
          and issubclass(RULES.get(n).builder, DirectRule)]
FEEDBACK = ["fa", "usf", "brsf", "frsf", "kp", "wm", "foa", "as", "asap", "asfp"]


class Basic(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """Not a Sequential: pooling and flattening happen in ``forward``, as in timm's ResNet."""

    def __init__(self, width=4, classes=C):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Basic(width, width)
        self.layer2 = Basic(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def features(self, x):
        return self.layer2(self.layer1(self.stem(x)))

    def head(self, h):
        return self.fc(h.mean((2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


class Attention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)  # fused, as timm's
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # x: (N, T, D)
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, D/heads)
        return self.proj(a.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), Attention(d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """8x8 images, 4x4 patches: 4 patch tokens and a class token, width 8."""

    def __init__(self, d=8, depth=2, classes=C):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, 4, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed  # (N, 5, D)
        return self.head(self.norm(self.blocks(x))[:, 0])


RESNET_BLOCKS = ["stem", "layer1", "layer2"]
VIT_BLOCKS = ["patch_embed", "blocks.0", "blocks.1"]
MODELS = {"resnet": (SmallResNet, RESNET_BLOCKS), "vit": (SmallViT, VIT_BLOCKS)}


def make(kind, seed=0):
    torch.manual_seed(seed)
    return MODELS[kind][0]().double().train()


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def grads(model):
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


# --- direct rules: blocks by name -----------------------------------------------------------------

@pytest.mark.parametrize("rule_name", DIRECT)
def test_blocks_given_as_child_names_equal_the_sequential_default(rule_name):
    torch.manual_seed(0)
    base = cf.models.build("resnet18", width=4, input_shape=(3, 8, 8), num_classes=C).double()
    names = [n for n, _ in base.named_children()][:-1]
    x, y = batch()
    results = []
    # a rule that may place its own cuts (asfp-lc's classifiers) is asked for one per block here
    takes = inspect.signature(RULES.get(rule_name).builder).parameters
    per_block = {"classifiers": "block"} if "classifiers" in takes else {}
    for blocks in (None, names):
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the rule's own random tensors (B, local modules) alike
        rule = cf.rules.build(rule_name, model, num_classes=C, blocks=blocks, **per_block)
        out = rule.step(x, y)
        results.append((out.logits, out.loss, grads(rule)))
    (la, lsa, ga), (lb, lsb, gb) = results
    assert torch.equal(la, lb) and torch.equal(lsa, lsb)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert (ga[k] is None) == (gb[k] is None), k
        if ga[k] is not None:
            assert torch.equal(ga[k], gb[k]), k


def test_a_non_sequential_model_without_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match=r"pass blocks=\[.*children: stem, layer1, layer2, fc"):
        cf.rules.build("dfa", make("resnet"), num_classes=C, input_shape=(3, 8, 8))


@pytest.mark.parametrize("kind", MODELS)
def test_dfa_by_name_is_each_blocks_own_backward_of_B_e(kind):
    """Reference: the same model run block by block from detached inputs, one VJP per block."""
    model = make(kind)
    _, names = MODELS[kind]
    x, y = batch()
    rule = cf.rules.build("dfa", model, num_classes=C, blocks=names, input_shape=(3, 8, 8), seed=3)
    ref = copy.deepcopy(model)
    out = rule.step(x, y)
    # the reference cut, written out per model
    if kind == "resnet":
        stages = [ref.stem, ref.layer1, ref.layer2]
        outputs, h = [], x
        for stage in stages:
            h = stage(h.detach())
            outputs.append(h)
        logits = ref.head(h.detach())
    else:
        h1 = ref.patch_embed(x)
        t = h1.detach().flatten(2).transpose(1, 2)
        t = torch.cat([ref.cls_token.expand(len(t), -1, -1), t], 1) + ref.pos_embed
        h2 = ref.blocks[0](t)
        h3 = ref.blocks[1](h2.detach())
        outputs = [h1, h2, h3]
        logits = ref.head(ref.norm(h3.detach())[:, 0])
    torch.testing.assert_close(out.logits, logits.detach())
    e = output_error(logits.detach(), y)
    signals = [(e @ B).view_as(h) for B, h in zip(rule.feedback.matrices, outputs)]
    assert [s.shape[1:] for s in signals] == rule.hidden_output_shapes()
    params = [p for p in ref.parameters()]
    expected = torch.autograd.grad([logits, *outputs], params, [e, *signals], allow_unused=True)
    for (k, p), g in zip(model.named_parameters(), expected):
        assert g is not None, f"{k}: no path in the reference"
        torch.testing.assert_close(p.grad, g, msg=lambda m: f"{k}: {m}")


def test_token_boundaries_give_B_the_shape_of_the_tokens():
    rule = cf.rules.build("dfa", make("vit"), num_classes=C, blocks=VIT_BLOCKS, input_shape=(3, 8, 8))
    assert rule.hidden_output_shapes() == [(8, 2, 2), (5, 8), (5, 8)]
    assert [tuple(B.shape) for B in rule.feedback.matrices] == [(C, 32), (C, 40), (C, 40)]
    # the class token and position embedding live outside the boundary modules: block "blocks.0" owns them
    assert {id(p) for p in rule._hidden[1].parameters()} >= {id(rule.model.cls_token), id(rule.model.pos_embed)}


def test_no_gradient_crosses_a_named_boundary():
    model = make("resnet")
    rule = cf.rules.build("dfa", model, num_classes=C, blocks=RESNET_BLOCKS, input_shape=(3, 8, 8))
    for i, B in enumerate(rule.feedback.matrices):
        if i != 1:
            B.zero_()
    rule.step(*batch())
    for name, module in [("stem", model.stem), ("layer1", model.layer1), ("layer2", model.layer2), ("fc", model.fc)]:
        nonzero = [bool(torch.count_nonzero(p.grad)) for p in module.parameters()]
        assert all(nonzero) if name in ("layer1", "fc") else not any(nonzero), name


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("rule_name", DIRECT)
def test_every_direct_rule_steps_on_a_non_sequential_model(rule_name, kind):
    model = make(kind)
    _, names = MODELS[kind]
    rule = cf.rules.build(rule_name, model, num_classes=C, blocks=names, input_shape=(3, 8, 8))
    params = list(rule.trainable_parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):
        out = rule.step(*batch())
        assert out.logits.shape == (4, C) and torch.isfinite(out.loss)
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        opt.zero_grad()
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    if rule_name == "shallow":  # everything below the last hidden block
        assert frozen and all(not k.startswith(names[-1]) and not k.startswith("fc") and not k.startswith("head")
                              for k in frozen)
    elif rule_name == "asfp-lc":  # the first layer, as the thesis (Sec. 5.1.1)
        assert {k.rsplit(".", 1)[0] for k in frozen} == {"stem.0" if kind == "resnet" else "patch_embed"}
    else:
        assert not frozen
    # hooks live only inside step: inference is the plain model, and copies carry no hooks
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    twin = copy.deepcopy(rule)
    torch.testing.assert_close(twin.model(batch()[0]), model(batch()[0]))
    twin.train().step(*batch())


@pytest.mark.parametrize("blocks, match", [
    (["layer1", "stem"], "forward order"),
    (["stem", "nope"], "no module named 'nope'.*children: stem, layer1, layer2, fc"),
    (["layer1.conv1", "layer2"], "'stem.0.weight' gets gradient from two blocks"),  # layer1's skip goes around
    (["stem", "fc"], "nothing trainable follows the last block boundary 'fc'"),
    ([], "non-empty list"),
])
def test_bad_block_boundaries_are_clear_errors(blocks, match):
    with pytest.raises(ValueError, match=match):
        cf.rules.build("dfa", make("resnet"), num_classes=C, blocks=blocks, input_shape=(3, 8, 8))


def test_a_boundary_must_output_one_tensor():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x), x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.fc = Pair(), nn.Linear(4, C)

        def forward(self, x):
            return self.fc(self.pair(x)[0])

    with pytest.raises(ValueError, match="block boundary 'pair' returns tuple; a boundary must output one tensor"):
        cf.rules.build("dfa", Net(), num_classes=C, blocks=["pair"], input_shape=(4,))
    rule = cf.rules.build("dfa", Net(), num_classes=C, blocks=["pair.lin"], input_shape=(4,))  # inside it: fine
    rule.step(torch.randn(3, 4), torch.randint(0, C, (3,)))


def test_product_feedback_needs_a_sequential():
    with pytest.raises(ValueError, match="feedback_init='product' needs an nn.Sequential"):
        cf.rules.build("dfa", make("resnet"), num_classes=C, blocks=RESNET_BLOCKS, input_shape=(3, 8, 8),
                       feedback_init="product")


# --- feedback-layer rules: every Linear/Conv2d, wherever it sits ----------------------------------

@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("rule_name", FEEDBACK)
def test_feedback_rules_swap_every_layer_of_a_non_sequential_model(rule_name, kind):
    model = make(kind)
    options = {"input_shape": (3, 8, 8)} if rule_name in ("as", "asap", "asfp") else {}
    rule = cf.rules.build(rule_name, model, num_classes=C, **options)
    assert not [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    params = list(rule.trainable_parameters())
    out = rule.step(*batch())
    assert torch.isfinite(out.loss)
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kind", MODELS)
def test_fa_differs_from_bp_and_equals_it_when_B_is_W(kind):
    x, y = batch()
    bp = make(kind)
    cf.rules.build("bp", bp, num_classes=C).step(x, y)
    for copy_w in (False, True):
        model = make(kind)
        rule = cf.rules.build("fa", model, num_classes=C)
        if copy_w:
            with torch.no_grad():
                for layer in rule.layers:
                    layer.feedback.copy_(layer.weight)
        rule.step(x, y)
        deep = bp.stem[0].weight.grad if kind == "resnet" else bp.patch_embed.weight.grad
        mine = model.stem[0].weight.grad if kind == "resnet" else model.patch_embed.weight.grad
        if copy_w:
            for (k, p), q in zip(model.named_parameters(), bp.parameters()):
                torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{k}: {m}")
        else:
            assert not torch.allclose(mine, deep)


def test_asap_with_k1_and_B_equal_W_is_bp_on_a_residual_net():
    x, y = batch()
    bp = make("resnet")
    cf.rules.build("bp", bp, num_classes=C).step(x, y)
    model = make("resnet")
    rule = cf.rules.build("asap", model, num_classes=C, k=1, reading="group-input", train_first=True, kp_decay=0.0, input_shape=(3, 8, 8))
    with torch.no_grad():
        for layer in rule.layers:
            layer.feedback.copy_(layer.weight)
    rule.step(x, y)
    mine = dict(model.named_parameters())
    for k, q in bp.named_parameters():
        torch.testing.assert_close(mine[k].grad, q.grad, msg=lambda m: f"{k}: {m}")


def test_asap_groups_follow_the_forward_order():
    model = make("vit")
    rule = cf.rules.build("asap", model, num_classes=C, k=2, input_shape=(3, 8, 8))
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(m)] for m in rule._sharing[:4]] == ["blocks.0.attn.qkv", "blocks.0.attn.proj",
                                                         "blocks.0.mlp.0", "blocks.0.mlp.2"]
    assert not model.patch_embed.weight.requires_grad  # the first layer to run is not trained (Sec. 5.1.1)
    # the first of each pair reads its own input; the second the shared one, matched token by token
    rule.step(*batch())
    assert model.blocks[0].mlp[2].weight.grad.shape == (8, 16)


def test_asap_needs_layers_that_run_once_per_forward():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.shared, self.fc = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, C)

        def forward(self, x):
            return self.fc(self.shared(torch.relu(self.shared(torch.relu(self.a(x))))))

    with pytest.raises(ValueError, match="'shared' runs 2 times per forward: use k=1"):
        cf.rules.build("asap", Twice(), num_classes=C, k=2, input_shape=(4,))
    rule = cf.rules.build("asap", Twice(), num_classes=C, k=1, reading="group-input", input_shape=(4,))
    rule.step(torch.randn(3, 4), torch.randint(0, C, (3,)))
    assert all(p.grad is not None for p in rule.trainable_parameters())


def test_child_names_of_a_sequential_group_children_into_spans_that_pipeline():
    """blocks=[child names] on an nn.Sequential: the children up to each name form one cut unit; the
    step equals the same rule on the model regrouped by hand, and the rule still pipelines."""
    torch.manual_seed(0)
    flat = cf.models.build("mlp:12-10-9-8-7-5").double()
    grouped = copy.deepcopy(flat)
    regrouped = nn.Sequential(nn.Sequential(grouped[0], grouped[1]), nn.Sequential(grouped[2], grouped[3]), grouped[4])
    x, y = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 5, (6,))
    results = []
    for model, blocks in ((flat, ["1", "3"]), (regrouped, None)):
        torch.manual_seed(1)
        rule = cf.rules.build("dfa", model, num_classes=5, blocks=blocks)
        rule.step(x, y)
        results.append([p.grad for p in model.parameters()])
        assert rule.num_units() == 3 and rule.pipeline_refusal() is None
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="blocks must name children in forward order, the head after the last"):
        cf.rules.build("dfa", copy.deepcopy(flat), num_classes=5, blocks=["3", "1"])
