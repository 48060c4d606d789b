import pytest
import torch

from creditflow.mechanisms import LOSSES, get_loss


def output_error(logits, target, loss_fn):
    """The reference: loss and ``e = dL/d(logits)`` by autograd on a leaf copy of the logits."""
    z = logits.detach().requires_grad_()
    loss = loss_fn(z, target)
    (e,) = torch.autograd.grad(loss, z)
    return loss.detach(), e


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_closed_form_error_equals_autograd(name):
    loss = LOSSES[name]
    logits = torch.randn(9, 5, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (9,))
    value, e = loss.error(logits, y)
    ref_value, ref_e = output_error(logits, y, loss.value)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(e, ref_e)


def test_error_does_not_touch_the_logits():
    logits = torch.randn(4, 3, requires_grad=True)
    before = logits.detach().clone()
    LOSSES["cross-entropy"].error(logits, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(logits.detach(), before) and logits.grad is None


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; available: cross-entropy, mse"):
        get_loss("hinge")
