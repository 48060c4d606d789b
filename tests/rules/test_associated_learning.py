"""Associated Learning: each component learns from its own two losses only (Kao & Chen 2021, Sec. 4).

The reference is written from the paper's equations: component i's associated loss
``||b_i(f_i(s_{i-1})) - g_i(t_{i-1})||^2`` differentiated w.r.t. f_i and b_i only, its autoencoder
loss ``||h_i(g_i(t_{i-1})) - t_{i-1}||^2`` w.r.t. g_i and h_i only, with ``s_{i-1}, t_{i-1}`` from a
separate forward pass without graph.
"""

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import creditflow as cf
from creditflow.models.associated import AssociatedNet, fold
from creditflow.train import RunConfig, train
from tests.reference import batch, tiny_associated, tiny_mlp


def three_components(seed=0) -> AssociatedNet:
    """A 3-component MLP with label widths 4-5-3 and one parameter the forward never uses."""
    torch.manual_seed(seed)
    units = [nn.Sequential(nn.Linear(6, 5), nn.ELU()), nn.Sequential(nn.Linear(5, 5), nn.ELU()),
             nn.Sequential(nn.Linear(5, 4), nn.ELU())]
    net = fold(units, input_shape=(6,), num_classes=3, width=4, label_widths=[4, 5, 3], bridge_width=6).double()
    net.components[1].f.register_parameter("unused", nn.Parameter(torch.ones(2, dtype=torch.float64)))
    return net


NETS = {"mlp3": three_components, "cnn-bn": lambda: tiny_associated("cnn", batch_norm=True)}


def squared(a, b, reduction):
    return ((a - b) ** 2).mean() if reduction == "mean" else ((a - b) ** 2).sum() / len(a)


def reference(net, x, y, assoc_weight=1.0, ae_weight=1.0, reduction="mean"):
    """(grads by parameter name, [assoc_i], [ae_i]) from the paper's two losses per component."""
    net = copy.deepcopy(net)
    s, t = x, F.one_hot(y, net.num_classes).double()
    grads, assoc, ae = {}, [], []
    for i, c in enumerate(net.components):
        s_i, t_i = c.f(s), c.g(t)
        a = squared(c.b(s_i), t_i, reduction)  # eq. 4.3
        r = squared(c.h(t_i), t, reduction)  # eq. 4.6
        for loss, w, parts in ((a, assoc_weight, ("f", "b")), (r, ae_weight, ("g", "h"))):
            named = [(f"components.{i}.{part}.{k}", p) for part in parts
                     for k, p in getattr(c, part).named_parameters()]
            got = torch.autograd.grad(w * loss, [p for _, p in named], allow_unused=True)
            grads.update({k: g for (k, _), g in zip(named, got) if g is not None})
        assoc.append(a.detach())
        ae.append(r.detach())
        s, t = s_i.detach(), t_i.detach()
    return grads, assoc, ae


def step_grads(net, x, y, **options):
    rule = cf.rules.build("al", net, num_classes=net.num_classes, **options)
    out = rule.step(x, y)
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}, out, rule


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("options", [{}, {"assoc_weight": 0.5, "ae_weight": 2.0, "reduction": "sum"}])
def test_each_component_gradient_equals_autograd_on_its_own_two_losses(name, options):
    net = NETS[name]()
    x, y = batch(net.input_shape)
    ref, assoc, ae = reference(net, x, y, **options)
    grads, out, rule = step_grads(net, x, y, **options)
    assert grads.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], msg=k)
    w_a, w_r = options.get("assoc_weight", 1.0), options.get("ae_weight", 1.0)
    torch.testing.assert_close(out.loss, w_a * sum(assoc) + w_r * sum(ae))
    metrics = rule.step_metrics()
    ids = range(1, len(net) + 1)
    assert list(metrics) == [f"assoc_loss/{i}" for i in ids] + [f"ae_loss/{i}" for i in ids]
    torch.testing.assert_close(torch.stack(list(metrics.values())), torch.stack(assoc + ae))
    assert not any(v.requires_grad for v in metrics.values()) and not out.loss.requires_grad
    if name == "mlp3":
        assert net.components[1].f.unused.grad is None


@pytest.mark.parametrize("name", NETS)
def test_no_gradient_crosses_a_component_boundary(name):
    net = NETS[name]()
    x, y = batch(net.input_shape)
    base, _, _ = step_grads(copy.deepcopy(net), x, y)
    for j in range(len(net)):
        other = copy.deepcopy(net)
        g = torch.Generator().manual_seed(j)
        with torch.no_grad():
            for i, c in enumerate(other.components):
                # Every parameter of every other component except those that *compute* component j's
                # inputs s_{j-1}, t_{j-1} (f_i, g_i below j: a forward path, not a gradient path).
                for part in ("f", "b", "g", "h") if i > j else ("b", "h") if i < j else ():
                    for p in getattr(c, part).parameters():
                        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        grads, _, _ = step_grads(other, x, y)
        mine = [k for k in base if k.startswith(f"components.{j}.")]
        for k in mine:
            assert torch.equal(grads[k], base[k]), f"component {j + 1}'s {k} changed with the other components"
        assert any(not torch.equal(grads[k], base[k]) for k in base if k not in mine)  # the perturbation bit


def test_one_fused_backward_equals_one_backward_per_component():
    net = three_components()
    x, y = batch(net.input_shape)
    fused, _, _ = step_grads(copy.deepcopy(net), x, y)
    s, t = x, F.one_hot(y, 3).double()
    for component in net.components:
        out = component(s, t)
        (out.assoc_loss + out.ae_loss).backward()
        s, t = out.s, out.t
    for k, p in net.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, fused[k], rtol=0, atol=0)


def test_inference_is_h1_to_hL_after_bL_after_fL_to_f1():
    net = three_components()
    x, y = batch(net.input_shape)
    f, b, h = net.f, net.b, net.h
    composed = h[0](h[1](h[2](b[2](f[2](f[1](f[0](x)))))))  # eq. 4.8 with L = 3
    rule = cf.rules.build("al", net, num_classes=3)
    assert rule.model is net
    out = rule.step(x, y)  # before the optimizer moves anything: the logits are eq. 4.8's output
    torch.testing.assert_close(out.logits, composed.detach())
    with torch.no_grad():  # outside training, rule(x) is the inference network
        torch.testing.assert_close(rule(x), composed)
    torch.testing.assert_close(net.inference_model()(x), composed)
    # The inference network holds the effective parameters only: every f_i and h_i, and b_L.
    keys = set(net.inference_model().state_dict())
    effective = {k for k in net.state_dict() if k.split(".")[2] in ("f", "h") or k.startswith("components.2.b.")}
    assert len(keys) == len(effective)
    assert sum(p.numel() for p in net.inference_model().parameters()) == sum(
        p.numel() for k, p in net.named_parameters() if k in effective)


def test_saved_inference_network_reloads_and_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    net = cf.models.build("al-mlp:6-5-4-3", input_shape=(6,), num_classes=3)
    rule = cf.rules.build("al", net, num_classes=3)
    opt = torch.optim.Adam(rule.param_groups(local_lr=2e-2), lr=1e-2)
    x, y = batch((6,))
    x = x.float()
    for _ in range(3):
        rule.step(x, y)
        opt.step()
        opt.zero_grad()
    net.eval()
    torch.save(net.inference_model().state_dict(), tmp_path / "weights.pt")
    torch.save(net.inference_model(), tmp_path / "module.pt")
    torch.manual_seed(1)
    twin = cf.models.build("al-mlp:6-5-4-3", input_shape=(6,), num_classes=3).inference_model().eval()
    assert not torch.equal(twin(x), net(x))
    twin.load_state_dict(torch.load(tmp_path / "weights.pt"))
    assert torch.equal(twin(x), net(x))
    assert torch.equal(torch.load(tmp_path / "module.pt", weights_only=False).eval()(x), net(x))
    assert torch.equal(twin(x).argmax(-1), net(x).argmax(-1))


def test_representations_are_the_inference_path_in_forward_order():
    net = tiny_associated("cnn", batch_norm=True)
    rule = cf.rules.build("al", net, num_classes=3)
    x, _ = batch(net.input_shape)
    reps = rule.representations(x)
    assert list(reps) == ["s1", "s2", "b2.1", "b2", "h2", "h1"]
    assert reps["s2"].shape == (7, 4, 2, 2) and reps["b2.1"].shape == (7, 6) and reps["b2"].shape == (7, 4)
    assert rule.training and all(m.training for m in net.modules())  # modes restored
    net.eval()
    torch.testing.assert_close(reps["h1"], net(x))
    assert not any(v.requires_grad for v in reps.values())


def test_param_groups_give_the_label_side_its_own_learning_rate():
    net = three_components()
    rule = cf.rules.build("al", net, num_classes=3)
    first, second = rule.param_groups(local_lr=0.5)
    label = {id(p) for c in net.components for p in [*c.g.parameters(), *c.h.parameters()]}
    assert {id(p) for p in second["params"]} == label and second["lr"] == 0.5
    assert len(first["params"]) + len(second["params"]) == len(list(rule.trainable_parameters()))
    assert "lr" not in rule.param_groups()[1]


def test_bad_pairings_and_options_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"rule 'al' needs a folded \(associated-learning\) model, got BlockNet \(al-mlp, .*al-vgg"):
        cf.rules.build("al", tiny_mlp(), num_classes=3)
    with pytest.raises(ValueError, match="3 classes, the rule 4"):
        cf.rules.build("al", tiny_associated(), num_classes=4)
    with pytest.raises(ValueError, match="ae_weight must be a number >= 0"):
        cf.rules.build("al", tiny_associated(), num_classes=3, ae_weight=-1)
    with pytest.raises(ValueError, match="unknown reduction 'max'; available: mean, sum"):
        cf.rules.build("al", tiny_associated(), num_classes=3, reduction="max")
    with pytest.raises(ValueError, match="rule 'dfa' cannot train a folded .associated-learning. model; use rule 'al'"):
        cf.rules.build("dfa", tiny_associated(), num_classes=3)
    with pytest.raises(ValueError, match="rule 'al' needs a folded .associated-learning. model"):
        cf.rules.build("al", tiny_mlp(), num_classes=3)
    cf.rules.build("bp", tiny_associated(), num_classes=3)  # end to end through the inference path
    with pytest.raises(ValueError, match="rule 'fa' cannot train a folded .associated-learning. model"):
        cf.rules.build("fa", tiny_associated(), num_classes=3)  # the Python API refuses it too, not only the trainer


def test_al_trains_end_to_end_and_logs_each_components_losses(tmp_path):
    cfg = RunConfig(rule="al", model="al-mlp:784-16-16-10", dataset="fashion-mnist-mini", epochs=1, batch_size=32,
                    max_steps_per_epoch=3, lr=1e-3, local_lr=2e-3, device="cpu", eval_batch_size=1000,
                    out=str(tmp_path))
    train(cfg, progress=False)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"assoc_loss/1", "assoc_loss/2", "ae_loss/1", "ae_loss/2"} <= row.keys()
    assert 0 <= row["test_acc"] <= 1
    with pytest.raises(ValueError, match="cannot train a folded .associated-learning. model"):
        train(cfg.model_copy(update={"rule": "dfa", "out": str(tmp_path / "dfa")}), progress=False)
