"""Performance rewrites in mechanisms give the numbers of the plain computation, bit for bit.

The conv feedback Function computes grad_input (with B) and grad_weight (from a) in one
``convolution_backward`` call when every tensor is contiguous; the plain form, kept for other
layouts, is two calls, one per gradient.
"""

import pytest
import torch

from creditflow.mechanisms.feedback import Conv2dFeedbackFn

CONV = torch.ops.aten.convolution_backward


def two_calls(g, x_shape, W, B, a, has_bias, stride, padding, groups):
    args = ((stride,) * 2, (padding,) * 2, (1, 1), False, (0, 0), groups)
    grad_x = CONV(g, g.new_empty(1).expand(x_shape), B, None, *args, (True, False, False))[0]
    _, grad_w, grad_b = CONV(g, a, W, [W.shape[0]] if has_bias else None, *args, (False, True, has_bias))
    return grad_x, grad_w, grad_b


def run(x, W, b, B, a, stride, padding, groups):
    out = Conv2dFeedbackFn.apply(x, W, b, B, a, (stride,) * 2, (padding,) * 2, (1, 1), groups)
    g = torch.randn_like(out)
    out.backward(g)
    return g


@pytest.mark.parametrize("stride,padding,groups", [(1, 0, 1), (2, 2, 1), (1, 1, 2)])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("a_is_x", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_feedback_backward_equals_two_plain_calls(stride, padding, groups, has_bias, a_is_x, layout):
    torch.manual_seed(0)
    x = torch.randn(4, 4, 9, 9).to(memory_format=layout).requires_grad_()
    W = torch.randn(6, 4 // groups, 3, 3).to(memory_format=layout).requires_grad_()
    b = torch.randn(6, requires_grad=True) if has_bias else None
    B = torch.randn(6, 4 // groups, 3, 3)  # contiguous, as FeedbackConv2d stores it
    a = x.detach() if a_is_x else torch.randn(4, 4, 9, 9).to(memory_format=layout)
    g = run(x, W, b, B, a, stride, padding, groups)
    ref = two_calls(g, x.shape, W.detach(), B, a, has_bias, stride, padding, groups)
    assert torch.equal(x.grad, ref[0]) and torch.equal(W.grad, ref[1])
    if has_bias:
        assert torch.equal(b.grad, ref[2])


def test_conv_feedback_with_an_activation_of_another_shape_still_works():
    # 9x9 and 10x10 both give 5x5 with stride 2, padding 1: the weight gradient comes from a.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    a = torch.randn(2, 3, 10, 10)
    W = torch.randn(5, 3, 3, 3, requires_grad=True)
    B = torch.randn(5, 3, 3, 3)
    g = run(x, W, None, B, a, 2, 1, 1)
    ref = two_calls(g, x.shape, W.detach(), B, a, False, 2, 1, 1)
    assert x.grad.shape == x.shape
    assert torch.equal(x.grad, ref[0]) and torch.equal(W.grad, ref[1])
