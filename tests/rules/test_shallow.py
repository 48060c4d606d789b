import copy

import torch

import creditflow as cf
from tests.reference import batch, bp_grads, tiny_cnn


def test_shallow_changes_exactly_the_last_two_layers():
    model = tiny_cnn()
    before = copy.deepcopy(model.state_dict())
    x, y = batch(model.input_shape)
    ref = bp_grads(copy.deepcopy(model), x, y)
    rule = cf.rules.build("shallow", model, num_classes=3)
    trained = {n for n, p in model.named_parameters() if any(p is q for q in rule.trainable_parameters())}
    assert trained == {"2.1.weight", "2.1.bias", "3.weight", "3.bias"}
    opt = torch.optim.Adam(rule.trainable_parameters(), lr=0.1)
    rule.step(x, y)
    # The last two layers get exactly BP's gradient.
    for name in trained:
        torch.testing.assert_close(model.get_parameter(name).grad, ref[name])
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trained
