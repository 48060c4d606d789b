import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import creditflow as cf
from creditflow.diagnostics import saved_tensor_bytes
from creditflow.mechanisms.feedback import active_policy
from creditflow.rules.activation_sharing import match_activation
from tests.reference import batch, bp_grads, output_error, tiny_cnn, tiny_mlp

MAKERS = [tiny_mlp, tiny_cnn, lambda: tiny_cnn(batch_norm=True)]


def weight_grads(model):
    return {k: p.grad for k, p in model.named_parameters()
            if p.grad is not None and not k.endswith("feedback")}


@pytest.mark.parametrize("name", ["as", "asap"])
@pytest.mark.parametrize("make", MAKERS)
def test_period_1_with_B_equal_to_W_is_bp(name, make):
    model = make()
    x, y = batch(model.input_shape)
    ref = bp_grads(copy.deepcopy(model), x, y)
    options = {"kp_decay": 0.0} if name == "asap" else {}
    # the group-input reading with k = 1: every layer reads its own input, B = W: BP
    rule = cf.rules.build(name, model, num_classes=3, k=1, train_first=True, reading="group-input", **options)
    with torch.no_grad():
        for layer in rule.layers:
            layer.feedback.copy_(layer.weight)
    rule.step(x, y)
    got = weight_grads(model)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def fa_deltas(Ws, bs, x, y, Bs):
    """Forward of a ReLU MLP and its errors sent down through B (Alg. 1 lines 14-17): (hs, deltas).

    ``hs[i]`` is layer i's input (``hs[0] = x``); ``deltas[i]`` the error at its pre-activation."""
    hs, As = [x], []
    for W, b in zip(Ws[:-1], bs[:-1]):
        As.append(hs[-1] @ W.T + b)
        hs.append(As[-1].clamp_min(0))
    delta = output_error(hs[-1] @ Ws[-1].T + bs[-1], y)  # delta_{M,K} = y - y*, divided by N (mean loss)
    deltas = [None] * len(Ws)
    for i in reversed(range(len(Ws))):
        deltas[i] = delta
        if i:
            delta = (delta @ Bs[i]) * (As[i - 1] > 0).double()  # phi' B^T delta
    return hs, deltas


def algorithm_1_grads(Ws, bs, x, y, Bs, K, train_first, asfp=False):
    """Algorithm 1 (Sec. 8.2) on an equal-width ReLU MLP: {layer: (grad W, grad B, grad b)}.

    Layer 0 is the frozen first layer W_{1,0} (Sec. 5.1.1) unless ``train_first``; the layers that
    learn form blocks m = 1..M of K layers, W_{m,1..K}. h~_1 is the input of W_{1,1} (line 2, with
    the frozen layer: its output); h~_{m+1} = h_{m,K-1} (line 8), the input of W_{m,K}. Lines 25-26:
    Delta W = Delta B = delta h~_m^T (as a gradient: the optimizer subtracts). ASFP (eqs. 4.7-4.10):
    W from its own input h_{m,k-1}, B from h~_m.
    """
    hs, deltas = fa_deltas(Ws, bs, x, y, Bs)
    first = 0 if train_first else 1
    layers = list(range(first, len(Ws)))
    blocks = [layers[i:i + K] for i in range(0, len(layers), K)]
    shared = hs[first]  # h~_1
    out = {}
    for block in blocks:
        for i in block:
            g_shared = deltas[i].T @ shared
            g_own = deltas[i].T @ hs[i]
            out[i] = (g_own if asfp else g_shared, g_shared, deltas[i].sum(0))
        shared = hs[block[-1]]  # h~_{m+1} = h_{m,K-1}: the input of the block's last layer
    return out


@pytest.mark.parametrize("k,train_first", [(2, False), (4, False), (2, True), (3, True)])
@pytest.mark.parametrize("name", ["as", "asap", "asfp"])
def test_gradients_follow_algorithm_1(name, k, train_first):
    model = tiny_mlp(dims=(5, 5, 5, 5, 5, 5, 5, 3))  # 7 layers of equal width but the last
    x, y = batch(model.input_shape)
    options = {} if name == "as" else {"kp_decay": 0.0}
    rule = cf.rules.build(name, model, num_classes=3, k=k, train_first=train_first, **options)
    Ws = [layer.weight.detach().clone() for layer in rule.layers]
    bs = [layer.bias.detach().clone() for layer in rule.layers]
    Bs = Ws if name == "as" else [layer.feedback.detach().clone() for layer in rule.layers]
    ref = algorithm_1_grads(Ws, bs, x, y, Bs, k, train_first, asfp=name == "asfp")
    rule.step(x, y)
    for i, layer in enumerate(rule.layers):
        if i not in ref:  # the frozen first layer (Sec. 5.1.1)
            assert layer.weight.grad is None and not layer.weight.requires_grad
            continue
        grad_W, grad_B, grad_b = ref[i]
        torch.testing.assert_close(layer.weight.grad, grad_W, msg=f"layer {i}: W")
        torch.testing.assert_close(layer.bias.grad, grad_b)
        if name != "as":  # eqs. 4.5-4.6 (ASAP: Delta B = Delta W) and 4.9-4.10 (ASFP)
            torch.testing.assert_close(layer.feedback.grad, grad_B, msg=f"layer {i}: B")
    assert model[0].unused.grad is None
    assert active_policy() is None  # inference is plain again


@pytest.mark.parametrize("name", ["as", "asap"])
def test_the_group_input_reading_is_kept_as_an_option(name):
    """reading='group-input': every layer of a group reads the input of the group's own first layer."""
    model = tiny_mlp(dims=(5, 5, 5, 5, 5, 5, 3))
    x, y = batch(model.input_shape)
    options = {} if name == "as" else {"kp_decay": 0.0}
    rule = cf.rules.build(name, model, num_classes=3, k=2, reading="group-input", **options)
    Ws = [layer.weight.detach().clone() for layer in rule.layers]
    bs = [layer.bias.detach().clone() for layer in rule.layers]
    Bs = Ws if name == "as" else [layer.feedback.detach().clone() for layer in rule.layers]
    hs, deltas = fa_deltas(Ws, bs, x, y, Bs)
    rule.step(x, y)
    for i in range(1, len(Ws)):
        first_of_group = 1 + (i - 1) // 2 * 2
        torch.testing.assert_close(rule.layers[i].weight.grad, deltas[i].T @ hs[first_of_group])


def bp_inputs_and_deltas(model, names, x, y):
    """Under BP: each named layer's input and the loss gradient at its output (its delta)."""
    acts, deltas = {}, {}

    def keep(name):
        def hook(module, args, out):
            acts[name] = args[0]
            out.register_hook(lambda g: deltas.__setitem__(name, g))
        return hook

    for name in names:
        model.get_submodule(name).register_forward_hook(keep(name))
    F.cross_entropy(model(x), y).backward()
    return acts, deltas


class ResidualMLP(nn.Module):
    """Two residual blocks of Linear layers (eq. 5.1 with Linear for conv): stem (frozen), blocks, head."""

    class Block(nn.Module):
        sharing_slots = (("fc1",), ("fc2",))

        def __init__(self, d):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, h):  # h_{l+2} = relu(W_{l+2} relu(W_{l+1} h_l) + h_l)
            return (self.fc2(self.fc1(h).relu()) + h).relu()

    def __init__(self, d=5, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.b1, self.b2, self.head = nn.Linear(d, d), self.Block(d), self.Block(d), nn.Linear(d, classes)
        self.input_shape = (d,)
        self.activation_sharing = {"first_group": 1, "own_input": ["head"]}
        self.double()

    def forward(self, x):
        return self.head(self.b2(self.b1(self.stem(x).relu())))


def test_a_residual_net_shares_block_inputs_as_eq_5_3():
    """k = 2 on two residual blocks: b1.fc1 reads x_1 (the frozen stem's output, its own input); the
    group {b1.fc2, b2.fc1} reads x_1 (eq. 5.3: Delta W~_{l+3} = delta_{l+3} h_l); b2.fc2 reads x_2;
    the head reads its own input. Gradients from the equations with autograd's deltas (B = W)."""
    model = ResidualMLP()
    x, y = batch(model.input_shape)
    acts, deltas = bp_inputs_and_deltas(copy.deepcopy(model), ["b1.fc1", "b1.fc2", "b2.fc1", "b2.fc2", "head"], x, y)
    x1, x2 = acts["b1.fc1"], acts["b2.fc1"]  # the blocks' inputs
    reads = {"b1.fc1": x1, "b1.fc2": x1, "b2.fc1": x1, "b2.fc2": x2, "head": acts["head"]}
    rule = cf.rules.build("as", model, num_classes=3, k=2)
    assert [(r.layer, r.reads) for r in rule.sharing_plan()] == [
        ("stem", "frozen (Sec. 5.1.1)"), ("b1.fc1", "own input"), ("b1.fc2", "input of b1.fc1"),
        ("b2.fc1", "input of b1.fc1"), ("b2.fc2", "input of b2.fc1"), ("head", "own input")]
    rule.step(x, y)
    for name, h in reads.items():
        torch.testing.assert_close(model.get_submodule(name).weight.grad, deltas[name].T @ h, msg=name)


@pytest.mark.parametrize("method", [1, 2, 3])
def test_conv_layers_read_the_matched_shared_activation(method):
    """A conv net (B = W, so the deltas are BP's): each conv's weight gradient is the convolution
    weight gradient of its delta and the shared activation brought to its input's shape by Sec.
    5.2.1's method, written here: copies concatenated to the channel count, then max/avg pooling
    to the map size (1, 2), or a fixed random 1x1 projection and average pooling (3)."""
    torch.manual_seed(0)
    model = cf.models.build("alexnet-asap:4-6-8", fc="16-12", input_shape=(3, 16, 16), num_classes=3).double()
    x, y = batch(model.input_shape)
    acts, deltas = bp_inputs_and_deltas(copy.deepcopy(model), ["1.0", "2.0"], x, y)
    rule = cf.rules.build("as", model, num_classes=3, k=2, match=method)
    rule.step(x, y)
    shared = acts["1.0"]  # the one group {conv2, conv3} reads conv2's input (the frozen stem's pooled output)
    for name in ("1.0", "2.0"):
        conv = model.get_submodule(name)
        c, hw = acts[name].shape[1], acts[name].shape[2:]
        if method == 3:
            C = getattr(rule, f"match{rule._sharing.index(conv)}", None)
            matched = shared if C is None else F.adaptive_avg_pool2d(torch.einsum("oc,nchw->nohw", C, shared), hw)
        else:
            pool = F.adaptive_max_pool2d if method == 1 else F.adaptive_avg_pool2d
            copies = torch.cat([shared] * -(-c // shared.shape[1]), 1)[:, :c]
            matched = pool(copies, hw)
        want = torch.nn.grad.conv2d_weight(matched, conv.weight.shape, deltas[name], conv.stride, conv.padding)
        torch.testing.assert_close(conv.weight.grad, want, msg=name)


def test_resnet18_plan_is_pinned():
    """Every conv of resnet18 names the activation it reads (k = 2): x_j is block j's input."""
    rule = cf.rules.build("asap", cf.models.build("resnet18", width=4), 10, k=2)
    plan = {r.layer: r.reads for r in rule.sharing_plan()}
    block_input = {j: f"input of {j}.conv1" for j in range(1, 9)}
    want = {"0.0": "frozen (Sec. 5.1.1)", "1.conv1": "own input", "9.2": "own input"}
    for j in range(1, 9):
        want[f"{j}.conv2"] = block_input[j]  # conv2 of block j: x_j
        if j > 1:
            want[f"{j}.conv1"] = block_input[j - 1]  # conv1 of block j: x_{j-1}
    for j in (3, 5, 7):
        want[f"{j}.shortcut.0"] = block_input[j - 1]  # the 1x1 shortcut: as its block's conv1
    assert plan == want
    k4 = {r.layer: r.reads for r in cf.rules.build("asap", cf.models.build("resnet18", width=4), 10, k=4).sharing_plan()}
    assert k4["2.conv2"] == k4["3.conv1"] == "input of 1.conv1" and k4["3.conv2"] == k4["5.conv1"] == "input of 3.conv1"


@pytest.mark.parametrize("method", [1, 2, 3])
@pytest.mark.parametrize("shared,target", [((3, 8, 8), (7, 4, 4)), ((6, 4, 4), (4, 4, 4)), ((3, 4, 4), (16,)),
                                           ((5,), (12,)), ((5,), (3,))])
def test_matching_gives_the_shape_the_layer_needs(method, shared, target):
    name = {1: "max", 2: "avg", 3: "random"}[method]
    h = torch.randn(2, *shared)
    C = None
    if method == 3:
        C = torch.randn(target[0], shared[0] if len(target) == 3 else h[0].numel())
    assert match_activation(h, target, name, C).shape == (2, *target)


def test_method_1_is_concatenation_and_max_pooling():
    h = torch.randn(2, 2, 4, 4)
    pooled = F.max_pool2d(h, 2)
    torch.testing.assert_close(match_activation(h, (5, 2, 2), "max"), torch.cat([pooled] * 3, 1)[:, :5])
    torch.testing.assert_close(match_activation(h, (2, 2, 2), "avg"), F.avg_pool2d(h, 2))


@pytest.mark.parametrize("match", [1, 2, 3])
def test_asap_trains_a_conv_net_with_every_matching_method(match):
    model = cf.models.build("alexnet-asap:4-6-8", fc="16-12", input_shape=(3, 32, 32), num_classes=3).double()
    rule = cf.rules.build("asap", model, num_classes=3, k=4, match=match)
    rule.step(*batch(model.input_shape))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in rule.trainable_parameters())


def test_B_never_aliases_W_and_is_visible_state():
    model = tiny_cnn()
    rule = cf.rules.build("asap", model, num_classes=3)
    trained = {id(p) for p in rule.trainable_parameters()}
    for layer in rule.layers:
        assert layer.feedback is not layer.weight
        assert layer.feedback.untyped_storage().data_ptr() != layer.weight.untyped_storage().data_ptr()
    assert all(id(layer.feedback) in trained for layer in rule.layers[1:])  # B trains (KP), beside W
    opt = torch.optim.SGD(rule.trainable_parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        rule.step(*batch(model.input_shape))
        opt.step()
        opt.zero_grad()
    assert not any(torch.equal(layer.feedback, layer.weight) for layer in rule.layers)


def test_asap_saves_fewer_tensor_bytes_than_bp():
    torch.manual_seed(0)
    model = cf.models.build("alexnet-asap:4-6-8", fc="16-12", input_shape=(3, 32, 32), num_classes=3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    bp = cf.rules.build("bp", copy.deepcopy(model), num_classes=3)
    asap = cf.rules.build("asap", model, num_classes=3, k=2)
    bp_bytes = saved_tensor_bytes(lambda: bp.step(x, y), exclude=bp)
    asap_bytes = saved_tensor_bytes(lambda: asap.step(x, y), exclude=asap)
    assert asap_bytes < bp_bytes


def test_asap_saved_bytes_on_resnet18_against_bp():
    # resnet18 keeps 4 full maps per BasicBlock under BP: the block input, BN1's input, ReLU1's
    # output (conv2's input) and BN2's input. ASAP (k=2) drops the unshared conv inputs (ReLU
    # masks instead); BN inputs stay unless saved as bfloat16 x_hat (see mechanisms/compact.py).
    torch.manual_seed(0)
    model = cf.models.build("resnet18", width=8, input_shape=(3, 32, 32), num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    def ratio(name, **options):
        rule = cf.rules.build(name, copy.deepcopy(model), num_classes=10, **options)
        return saved_tensor_bytes(lambda: rule.step(x, y), exclude=rule)

    bp = ratio("bp")
    exact, k4 = ratio("asap", k=2) / bp, ratio("asap", k=4) / bp
    assert exact < 0.9 and k4 < exact - 0.05
    assert ratio("asap", k=2, saved_norm="bfloat16") / bp < 0.7  # the "30% fewer bytes"
    assert ratio("asfp", k=2) / bp > 0.95  # W reads every layer's own input: nothing to drop


def test_compacted_asap_gives_the_gradients_of_uncompacted_asap():
    torch.manual_seed(0)
    model = cf.models.build("resnet18", width=4, input_shape=(3, 16, 16), num_classes=5).double()
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (3,))
    torch.manual_seed(1)  # the same random B for both
    compacted = cf.rules.build("asap", copy.deepcopy(model), num_classes=5, saved_norm="normalized")
    torch.manual_seed(1)
    plain = cf.rules.build("asap", copy.deepcopy(model), num_classes=5)
    for layer in plain.model.modules():  # undo the ReLU/max-pool swap: PyTorch's own modules
        for name, child in layer.named_children():
            if isinstance(child, nn.ReLU) and type(child) is not nn.ReLU:
                setattr(layer, name, nn.ReLU())
    assert any(type(m).__name__ == "CompactBatchNorm2d" for m in compacted.model.modules())
    assert not any(type(m).__name__ == "MaskReLU" for m in plain.model.modules())
    compacted.step(x, y), plain.step(x, y)
    pairs = [(name, a, b) for (name, a), b in zip(compacted.named_parameters(), nn.Module.parameters(plain))
             if a.requires_grad]
    assert len(pairs) > 40
    for name, a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_period_longer_than_the_network_and_bad_options():
    model = tiny_mlp(unused_parameter=False)
    rule = cf.rules.build("asap", model, num_classes=3, k=10)
    rule.step(*batch(model.input_shape))
    assert all(p.grad is not None for p in rule.trainable_parameters())
    with pytest.raises(ValueError, match="k must be a positive integer"):
        cf.rules.build("asap", tiny_mlp(), num_classes=3, k=0)
    with pytest.raises(ValueError, match="unknown match 4; available: 1 \\(max\\)"):
        cf.rules.build("as", tiny_mlp(), num_classes=3, match=4)


@pytest.mark.parametrize("make", MAKERS)
def test_asfp_W_learns_from_its_input_and_B_from_the_shared_activation(make):
    model = make()
    x, y = batch(model.input_shape)
    shared = copy.deepcopy(model)
    ref_W = cf.rules.build("kp", copy.deepcopy(model), num_classes=3, kp_decay=0.0)  # W: delta h^T (KP/FA)
    ref_B = cf.rules.build("asap", shared, num_classes=3, k=2, kp_decay=0.0)  # B: delta h~^T (as ASAP)
    rule = cf.rules.build("asfp", model, num_classes=3, k=2, kp_decay=0.0)
    for r in (ref_W, ref_B):  # the same B everywhere, so the same deltas
        with torch.no_grad():
            for layer, mine in zip(r.layers, rule.layers):
                layer.feedback.copy_(mine.feedback)
    for r in (rule, ref_W, ref_B):
        r.step(x, y)
    for mine, w, b in zip(rule.layers[1:], ref_W.layers[1:], ref_B.layers[1:]):
        torch.testing.assert_close(mine.weight.grad, w.weight.grad)
        torch.testing.assert_close(mine.feedback.grad, b.feedback.grad)


def test_a_copied_rule_shares_on_its_own_layers():
    model = tiny_cnn()
    x, y = batch(model.input_shape)
    rule = cf.rules.build("asap", model, num_classes=3)
    twin = copy.deepcopy(rule)
    rule.step(x, y)
    twin.step(x, y)
    for a, b in zip(rule.layers, twin.layers):
        if a.weight.grad is not None:
            torch.testing.assert_close(a.weight.grad, b.weight.grad)


@pytest.mark.parametrize("make", MAKERS)
def test_asfp_lc_with_period_1_and_symmetric_feedback_is_local_learning(make):
    # k = 1, B = W and B_c = A: every block learns from the exact gradient of its own classifier's
    # loss, which is the `local` rule with trained 2x2-pooled classifiers.
    model = make()
    x, y = batch(model.input_shape)
    ref_model = copy.deepcopy(model)
    ref = cf.rules.build("local", ref_model, num_classes=3, pool=2, learn_classifier=True)
    rule = cf.rules.build("asfp-lc", model, num_classes=3, k=1, train_first=True, kp_decay=0.0)
    with torch.no_grad():
        for layer in rule.layers:
            layer.feedback.copy_(layer.weight)
        for A, Bc, A_ref in zip(rule.classifiers, rule.classifier_feedback, ref.classifiers):
            A.weight.copy_(A_ref.weight)
            Bc.weight.copy_(A_ref.weight)
    rule.step(x, y)
    ref.step(x, y)
    got, want = weight_grads(model), weight_grads(ref_model)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    for A, A_ref in zip(rule.classifiers, ref.classifiers):
        torch.testing.assert_close(A.weight.grad, A_ref.weight.grad)
    fresh = cf.rules.build("asfp-lc", make(), num_classes=3)
    assert not any(torch.equal(A.weight, Bc.weight) for A, Bc in zip(fresh.classifiers, fresh.classifier_feedback))
    assert not any(id(Bc.weight) in {id(p) for p in fresh.parameters()} for Bc in fresh.classifier_feedback)


def test_asfp_lc_group_classifiers_sit_at_the_end_of_each_sharing_group():
    """Sec. 5.2.4: "a local classifier at the end of the ASFP block" (a sharing group). On resnet18's
    plan a group ends in every residual block at k = 2 and in every other one at k = 4."""
    from creditflow.rules.activation_sharing import group_end_blocks

    model = cf.models.build("resnet18", width=4, input_shape=(3, 8, 8), num_classes=10)
    assert group_end_blocks(model, 10, "cross-entropy", {"k": 2, "input_shape": (3, 8, 8)}) == [str(i) for i in range(1, 9)]
    assert group_end_blocks(model, 10, "cross-entropy", {"k": 4, "input_shape": (3, 8, 8)}) == ["1", "3", "5", "7", "8"]
    rule = cf.rules.build("asfp-lc", model, num_classes=10, k=4, classifiers="group", input_shape=(3, 8, 8))
    assert len(rule.classifiers) == 5 and rule.num_units() == 6
    per_block = cf.rules.build("asfp-lc", cf.models.build("resnet18", width=4, input_shape=(3, 8, 8), num_classes=10),
                               num_classes=10, k=4, input_shape=(3, 8, 8))
    assert len(per_block.classifiers) == 9  # the default: one per hidden block (stem included)
    with pytest.raises(ValueError, match="unknown classifiers 'layer'; available: group"):
        cf.rules.build("asfp-lc", model, num_classes=10, classifiers="layer")


def test_asfp_lc_group_placement_draws_no_random_numbers_of_its_own():
    """Finding the groups builds a throwaway asfp: it must not shift the rule's own random B."""
    from creditflow.rules.activation_sharing import group_end_blocks

    shape = (3, 8, 8)
    model = cf.models.build("resnet18", width=4, input_shape=shape, num_classes=10)
    names = group_end_blocks(model, 10, "cross-entropy", {"k": 4, "input_shape": shape})
    rules = []
    for options in ({"classifiers": "group"}, {"blocks": names}):
        torch.manual_seed(3)
        rules.append(cf.rules.build("asfp-lc", copy.deepcopy(model), num_classes=10, k=4, input_shape=shape, **options))
    a, b = (r.state_dict() for r in rules)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="every sharing group ends in the head"):
        cf.rules.build("asfp-lc", cf.models.build("mlp:784-16-16-10"), num_classes=10, k=4, classifiers="group")
