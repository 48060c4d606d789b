import torch

import creditflow as cf
from tests.reference import batch, bp_grads, tiny_cnn, tiny_mlp


def test_bp_equals_torch_autograd():
    for make in (tiny_mlp, tiny_cnn):
        model = make()
        x, y = batch(model.input_shape)
        ref = bp_grads(model, x, y)
        rule = cf.rules.build("bp", model, num_classes=3)
        rule.step(x, y)
        got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k])
        assert model[0].unused.grad is None if hasattr(model[0], "unused") else True
