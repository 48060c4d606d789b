"""Rules on timm models (optional extra ``timm``): a ResNet-18 and a ViT-Tiny at 32x32.

Skipped where timm is not installed (it needs a torchvision that matches torch; see
docs/own-models.md). Small widths and depths, batch 2, float64, so the file runs in seconds on a CPU.
The same machinery runs without timm in tests/rules/test_own_models.py.
"""

import copy

import pytest
import torch
from torch import nn

import creditflow as cf
from creditflow.mechanisms.feedback import FeedbackLayer

timm = pytest.importorskip("timm")

C = 10
DIRECT = ("dfa", "drtp", "las", "ltas", "shallow", "local", "asfp-lc")
BLOCKS = {"resnet": ["layer1", "layer2", "layer3", "layer4"],  # stem + layer1 is the first block
          "vit": ["patch_embed", "blocks.0", "blocks.1"]}  # tokens (N, 65, 192) at each boundary


def make(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "resnet":  # resnet18's layout (2-2-2-2 BasicBlocks), 8-64 channels instead of 64-512 (stem: 64)
        model = timm.create_model("resnet18", pretrained=False, num_classes=C, channels=(8, 16, 32, 64),
                                  zero_init_last=False)
    else:  # 4x4 patches of a 32x32 image: 64 tokens + the class token; 2 of ViT-Tiny's 12 blocks
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=C, img_size=32,
                                  patch_size=4, depth=2)
    return model.double().train()


def batch(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def options(rule, kind):
    if rule in DIRECT:
        return {"blocks": BLOCKS[kind], "input_shape": (3, 32, 32)}
    if rule in ("as", "asap", "asfp"):  # they size the activation matching from a probe
        return {"input_shape": (3, 32, 32)}
    return {}


@pytest.mark.parametrize("kind", ["resnet", "vit"])
@pytest.mark.parametrize("rule_name", ["bp", "fa", "usf", "brsf", "frsf", "kp", "wm", "foa", "as", "asap", "asfp",
                                       "dfa", "drtp", "las", "ltas", "shallow", "local", "asfp-lc"])
def test_one_step_fills_finite_gradients_on_the_right_parameters(rule_name, kind):
    model = make(kind)
    rule = cf.rules.build(rule_name, model, num_classes=C, **options(rule_name, kind))
    params = rule.trainable_parameters()
    out = rule.step(*batch())
    assert out.logits.shape == (2, C) and torch.isfinite(out.loss)
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    untrained = {k.rsplit(".", 1)[0] for k, p in model.named_parameters() if not p.requires_grad}
    if rule_name == "shallow":  # only the block ending at the last boundary and the head learn
        last = BLOCKS[kind][-1]
        assert trained == {k for k, _ in model.named_parameters()
                           if k.startswith(last) or not any(k.startswith(b) for b in ("conv1", "bn1", "layer", "patch",
                                                                                         "cls", "pos", "blocks"))}
    elif rule_name in ("as", "asap", "asfp", "asfp-lc"):  # the first layer to run is not trained (thesis Sec. 5.1.1)
        assert untrained == {"conv1" if kind == "resnet" else "patch_embed.proj"}
    else:
        assert not untrained
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, k
    if rule_name != "bp":  # every nn.Linear/nn.Conv2d became a feedback layer (feedback rules), still one
        plain = [type(m) for m in model.modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, FeedbackLayer)]
        assert not plain or (rule_name in DIRECT and rule_name != "asfp-lc")


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_fa_differs_from_bp_and_equals_it_when_B_is_W(kind):
    x, y = batch()
    bp = make(kind)
    cf.rules.build("bp", bp, num_classes=C).step(x, y)
    reference = dict(bp.named_parameters())
    for copy_w in (False, True):
        model = make(kind)
        modules = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        assert len(modules) == (22 if kind == "resnet" else 10)  # qkv, proj, fc1, fc2 per ViT block
        rule = cf.rules.build("fa", model, num_classes=C)
        swapped = {n for n, m in model.named_modules() if m in rule.layers}
        assert swapped == modules  # every Conv2d / Linear, wherever it sits
        if copy_w:
            with torch.no_grad():
                for layer in rule.layers:
                    layer.feedback.copy_(layer.weight)
        rule.step(x, y)
        first = "conv1.weight" if kind == "resnet" else "patch_embed.proj.weight"
        grads = {k: p.grad for k, p in model.named_parameters()}
        if copy_w:
            for k, g in grads.items():
                torch.testing.assert_close(g, reference[k].grad, msg=lambda m: f"{k}: {m}")
        else:
            assert not torch.allclose(grads[first], reference[first].grad)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_dfa_cuts_the_timm_forward_at_the_named_modules(kind):
    model = make(kind)
    rule = cf.rules.build("dfa", model, num_classes=C, **options("dfa", kind), seed=0)
    shapes = rule.hidden_output_shapes()
    if kind == "resnet":
        assert shapes == [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)]
    else:
        assert shapes == [(64, 192), (65, 192), (65, 192)]  # patch tokens, then with the class token
    # only block 1's signal: every other hidden block's parameters get exactly zero, the head its own
    for i, B in enumerate(rule.feedback.matrices):
        if i != 1:
            B.zero_()
    rule.step(*batch())
    owner = {id(p): i for i, seg in enumerate(rule._hidden) for p in seg.parameters()}
    for k, p in model.named_parameters():
        i = owner.get(id(p))
        if i is None:  # the head
            continue
        assert bool(torch.count_nonzero(p.grad)) == (i == 1), k
    # the model itself is untouched: no hooks left, inference unchanged, copies step too
    assert all(not m._forward_hooks for m in model.modules())
    copy.deepcopy(rule).step(*batch())


def test_asap_on_a_vit_shares_within_each_attention_and_mlp():
    model = make("vit")
    rule = cf.rules.build("asap", model, num_classes=C, k=2, input_shape=(3, 32, 32))
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(m)] for m in rule._sharing[:4]] == ["blocks.0.attn.qkv", "blocks.0.attn.proj",
                                                         "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


def test_the_docs_example_runs(monkeypatch, capsys):
    """docs/own-models.md's timm example, as printed there, on 2 training batches and 64 test images."""
    import dataclasses
    import itertools
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "own-models.md").read_text()
    code = re.search(r"### Example.*?```python\n(.*?)```", doc, re.S).group(1)
    load, batches = cf.data.load, cf.data.batches

    def small(name):
        s = load(name)
        return dataclasses.replace(s, test=cf.data.ImageSet(s.test.images[:64], s.test.labels[:64]))

    monkeypatch.setattr(cf.data, "load", small)
    monkeypatch.setattr(cf.data, "batches", lambda *a, **k: itertools.islice(batches(*a, **k), 2))
    exec(compile(code, "docs/own-models.md", "exec"), {})
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet18") or
            line.startswith("| vit-tiny")]
    assert len(rows) == 12
