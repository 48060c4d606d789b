"""Every registered rule, through one table: the contract of docs/rules.md."""

import copy

import pytest
import torch

import creditflow as cf
from creditflow.registry import RULES as RULES_REGISTRY
from tests.reference import batch, needs_folded, tiny_associated, tiny_cnn, tiny_mlp

RULES = cf.rules.available()
MODELS = {"mlp": lambda: tiny_mlp(unused_parameter=False), "cnn": tiny_cnn, "cnn-bn": lambda: tiny_cnn(batch_norm=True)}


AL_MODELS = {"mlp": lambda: tiny_associated("mlp"), "cnn": lambda: tiny_associated("cnn"),
             "cnn-bn": lambda: tiny_associated("cnn", batch_norm=True)}


def make_model(rule_name, model_name):
    """The tiny model of that kind; a rule that needs a folded model (AL) gets its tiny twin of that type."""
    needs = needs_folded(rule_name)
    return (AL_MODELS if needs else MODELS)[model_name]()


def refusal(rule_name, model):
    """Why the rule declares it cannot train ``model`` (DTP: fully connected models only), or None."""
    return RULES_REGISTRY.get(rule_name).builder.model_refusal(model)


def buffers_to_keep(rule):
    # Buffers other than BatchNorm statistics are feedback tensors and must not change, except those
    # a rule updates by design and names in ``mutable_buffers`` (sign symmetry's B follows W's sign,
    # the weight mirror's B learns).
    mutable = set(getattr(rule, "mutable_buffers", ()))
    return {k: v.clone() for k, v in rule.named_buffers()
            if "running" not in k and "num_batches" not in k and k.rsplit(".", 1)[-1] not in mutable}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("rule_name", RULES)
def test_rule_contract(rule_name, model_name):
    model = make_model(rule_name, model_name)
    if refusal(rule_name, model):
        assert model_name != "mlp"  # every rule trains some model of this table
        with pytest.raises(ValueError, match="needs an MLP"):
            cf.rules.build(rule_name, model, num_classes=3)
        return
    rule = cf.rules.build(rule_name, model, num_classes=3)
    params = list(rule.trainable_parameters())
    assert params and all(p.requires_grad for p in params)
    fixed = buffers_to_keep(rule)
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):
        out = rule.step(*batch(model.input_shape))
        assert out.logits.shape == (7, 3) and out.loss.ndim == 0 and not out.loss.requires_grad
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        opt.zero_grad()
    for k, v in buffers_to_keep(rule).items():
        assert torch.equal(v, fixed[k]), f"{rule_name} changed fixed buffer {k}"
    assert all(torch.isfinite(v).all() for v in rule.buffers())
    # Inference is the plain model.
    model.eval()
    x, _ = batch(model.input_shape)
    assert model(x).shape == (7, 3)
    # state_dict round-trips into a freshly built rule.
    twin = cf.rules.build(rule_name, copy.deepcopy(make_model(rule_name, model_name)), num_classes=3)
    twin.load_state_dict(rule.state_dict())
    twin.eval()
    torch.testing.assert_close(twin.model(x), model(x))


def test_unknown_rule_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown rule 'dfaa'; available: .*dfa.*\(closest: dfa\)"):
        cf.rules.build("dfaa", tiny_mlp(), num_classes=3)


def test_bad_rule_option_is_a_clear_error():
    with pytest.raises(ValueError, match=r"bad options for rule 'dfa': unknown option 'no_such_option'; its options: .*feedback_scale=1.0"):
        cf.rules.build("dfa", tiny_mlp(), num_classes=3, no_such_option=1)
    # a value of the wrong kind (a YAML scalar from --rule-option) is named, not a TypeError deep inside
    with pytest.raises(ValueError, match=r"bad options for rule 'dfa': feedback_scale must be a number \(default 1.0\), got 'abc'"):
        cf.rules.build("dfa", tiny_mlp(), num_classes=3, feedback_scale="abc")
    with pytest.raises(ValueError, match=r"bad options for rule 'dfa': seed must be an integer"):
        cf.rules.build("dfa", tiny_mlp(), num_classes=3, seed=1.5)
    with pytest.raises(ValueError, match="feedback_scale must be > 0"):
        cf.rules.build("dfa", tiny_mlp(), num_classes=3, feedback_scale=0)


def test_rules_work_on_a_users_own_sequential():
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()),
                                torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()),
                                torch.nn.Linear(8, 2))
    for name in RULES:
        if needs_folded(name):  # AL: its own models
            with pytest.raises(ValueError, match="needs a folded .associated-learning. model"):
                cf.rules.build(name, copy.deepcopy(model), num_classes=2)
            continue
        rule = cf.rules.build(name, copy.deepcopy(model), num_classes=2)
        rule.step(torch.randn(5, 4), torch.randint(0, 2, (5,)))
        assert all(p.grad is not None for p in rule.trainable_parameters())


@pytest.mark.parametrize("rule_name", RULES)
def test_layers_stay_what_they_were_and_the_plain_network_comes_back(rule_name):
    """After ``build`` every module is still an instance of its own class (a Conv2d is a Conv2d), and
    ``rule.plain_model()`` gives the trained network in plain layers: its state_dict loads strictly
    into a freshly built model, which then predicts exactly as the rule's model."""
    kind = "cnn-bn" if refusal(rule_name, make_model(rule_name, "cnn-bn")) is None else "mlp"
    model = make_model(rule_name, kind)
    fresh = copy.deepcopy(model)
    classes = [type(m) for m in model.modules()]
    rule = cf.rules.build(rule_name, model, num_classes=3)
    assert all(isinstance(m, cls) for m, cls in zip(model.modules(), classes, strict=True))
    opt = torch.optim.SGD(rule.parameters(), lr=0.1)  # nn.Module's parameters(): safe for any optimizer
    rule.step(*batch(model.input_shape))
    opt.step()
    plain = rule.plain_model()
    target = fresh.inference_model() if needs_folded(rule_name) else fresh
    target.load_state_dict(plain.state_dict(), strict=True)
    assert [type(m) for m in plain.modules()] == [type(m) for m in target.modules()]
    x, _ = batch(model.input_shape)
    rule.eval()
    target.eval()
    torch.testing.assert_close(target(x), rule.model(x))


def test_requires_grad_reaches_every_tensor_of_a_rule():
    rule = cf.rules.build("shallow", tiny_mlp(), num_classes=3)  # Shallow freezes its lower blocks
    assert any(not p.requires_grad for p in rule.parameters())
    rule.requires_grad_(True)
    assert all(p.requires_grad for p in rule.parameters())
