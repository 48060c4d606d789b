import copy

import pytest
import torch
from torch import nn

from creditflow.mechanisms import FeedbackConv2d, FeedbackLinear, attach_feedback
from creditflow.mechanisms.feedback import Conv2dFeedbackFn, LinearFeedbackFn


def test_linear_feedback_fn_equals_autograd_when_B_is_W():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)  # extra leading dim on purpose
    W = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = lambda x, W, b: LinearFeedbackFn.apply(x, W, b, W.detach(), x)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W, b))


@pytest.mark.parametrize("stride,padding,groups", [(1, 0, 1), (2, 2, 1), (1, 1, 2)])
def test_conv_feedback_fn_equals_autograd_when_B_is_W(stride, padding, groups):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def fn(x, W, b):
        return Conv2dFeedbackFn.apply(x, W, b, W.detach(), x, (stride,) * 2, (padding,) * 2, (1, 1), groups)

    assert torch.autograd.gradcheck(fn, (x, W, b))


def test_linear_input_gradient_uses_B_and_weight_gradient_uses_activation():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, 3, dtype=torch.float64)  # a "shared" activation, not x
    W = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, dtype=torch.float64)
    g = torch.randn(5, 4, dtype=torch.float64)
    LinearFeedbackFn.apply(x, W, None, B, a).backward(g)
    torch.testing.assert_close(x.grad, g @ B)
    torch.testing.assert_close(W.grad, g.T @ a)


def test_conv_input_gradient_uses_B():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    Conv2dFeedbackFn.apply(x, W, None, B, x, (2, 2), (1, 1), (1, 1), 1).backward(g)
    x_ref = x.detach().requires_grad_()
    torch.nn.functional.conv2d(x_ref, B, None, 2, 1).backward(g)  # d/dx of a conv with weight B
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_attach_feedback_swaps_layers_and_shares_parameters_not_storage():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten()), nn.Linear(8, 3))
    w_conv, w_lin = model[0][0].weight, model[1].weight
    layers = attach_feedback(model, lambda layer: layer.weight)
    assert isinstance(model[0][0], FeedbackConv2d) and isinstance(model[1], FeedbackLinear)
    assert model[0][0].weight is w_conv and model[1].weight is w_lin
    for layer in layers:
        assert layer.feedback.untyped_storage().data_ptr() != layer.weight.untyped_storage().data_ptr()
        assert not layer.feedback.requires_grad
        torch.testing.assert_close(layer.feedback, layer.weight.detach())
    assert {"1.weight", "1.bias", "1.feedback", "0.0.feedback"} <= set(model.state_dict())
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)


def test_attach_feedback_rejects_model_without_layers():
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        attach_feedback(nn.Sequential(nn.ReLU()), lambda layer: layer.weight)


def test_plain_copy_turns_feedback_layers_back_into_plain_layers():
    from creditflow.mechanisms.feedback import plain_copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Flatten()),
                          nn.Linear(4 * 3 * 3, 3, bias=False)).double()
    reference = copy.deepcopy(model)
    layers = attach_feedback(model, lambda layer: torch.randn_like(layer.weight))  # B != W
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    plain = plain_copy(model)
    assert isinstance(plain[0][0], nn.Conv2d) and isinstance(plain[1], nn.Linear) and plain[1].bias is None
    assert isinstance(model[0][0], FeedbackConv2d) and model[0][0] is layers[0]  # the original is untouched
    assert all(p.grad is None for p in plain.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(plain.parameters(), model.parameters()))
    plain(x).sum().backward()  # BP: the same gradients as the model before feedback was attached
    reference(x).sum().backward()
    for p, q in zip(plain.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert isinstance(plain_copy(layers[1]), nn.Linear)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("train_W", [True, False])
def test_trainable_feedback_gets_the_weight_gradient(kind, train_W):
    torch.manual_seed(0)
    if kind == "linear":
        x, W0, g = (torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                    torch.randn(5, 4, dtype=torch.float64))
        fn = lambda x, W, B: LinearFeedbackFn.apply(x, W, None, B, x)  # noqa: E731
    else:
        x, W0, g = (torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64),
                    torch.randn(2, 4, 3, 3, dtype=torch.float64))
        fn = lambda x, W, B: Conv2dFeedbackFn.apply(x, W, None, B, x, (2, 2), (1, 1), (1, 1), 1)  # noqa: E731
    x.requires_grad_()
    W = W0.clone().requires_grad_(train_W)
    B = nn.Parameter(torch.randn_like(W0))
    fn(x, W, B).backward(g)
    W_ref = W0.clone().requires_grad_()
    fn(x.detach(), W_ref, torch.randn_like(W0)).backward(g)  # delta a^T does not depend on B
    torch.testing.assert_close(B.grad, W_ref.grad)
    if train_W:
        torch.testing.assert_close(W.grad, W_ref.grad)
        assert W.grad.data_ptr() != B.grad.data_ptr()  # decay on one must not reach the other
    else:
        assert W.grad is None


def test_feedback_computed_from_W_inside_the_graph_stays_a_constant():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    W = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 4, dtype=torch.float64)
    LinearFeedbackFn.apply(x, W, None, W * 1.0, x).backward(g)  # B: a non-leaf that requires grad
    torch.testing.assert_close(W.grad, g.T @ x)  # delta a^T only; nothing flows back through B


def test_learn_feedback_turns_the_buffer_into_a_parameter_with_the_same_key():
    from creditflow.mechanisms.feedback import learn_feedback

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.ReLU(), nn.Linear(8, 2))
    layers = attach_feedback(model, lambda layer: torch.randn_like(layer.weight))
    keys, values = set(model.state_dict()), [layer.feedback.clone() for layer in layers]
    Bs = [learn_feedback(layer) for layer in layers]
    assert set(model.state_dict()) == keys
    assert all(isinstance(B, nn.Parameter) and B is layer.feedback for B, layer in zip(Bs, layers))
    assert all(torch.equal(B, v) for B, v in zip(Bs, values))
    assert not list(model.buffers()) and {id(B) for B in Bs} <= {id(p) for p in model.parameters()}
    model(torch.randn(5, 1, 4, 4)).sum().backward()
    for layer in layers:
        torch.testing.assert_close(layer.feedback.grad, layer.weight.grad)


def test_mirror_product_is_y_x_transpose_for_a_strided_dilated_grouped_conv():
    from creditflow.mechanisms.feedback import mirror_product

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2).double()
    (layer,) = attach_feedback(nn.Sequential(conv), lambda layer: layer.weight)
    W = layer.weight.detach()
    torch.manual_seed(1)
    got = mirror_product(layer, 7, 0.5)
    torch.manual_seed(1)
    x = torch.randn(7, 4, 5, 5, dtype=torch.float64) * 0.5  # 5 = dilated extent of a 3x3 kernel
    taps = x[:, :, ::2, ::2]  # (7, 4, 3, 3): the inputs each kernel tap sees
    expected = torch.empty_like(W)
    for group in range(2):
        out, inp = slice(3 * group, 3 * group + 3), slice(2 * group, 2 * group + 2)
        y = torch.einsum("ocij,kcij->ko", W[out], taps[:, inp])  # y_k = W x_k, no bias
        expected[out] = torch.einsum("ko,kcij->ocij", y, taps[:, inp]) / 7
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("layer", [nn.Linear(400, 300), nn.Conv2d(32, 64, 3, groups=2)])
def test_init_std_is_the_std_of_random_like_init(layer):
    from creditflow.mechanisms.feedback import init_std, random_like_init

    torch.manual_seed(0)
    assert abs(random_like_init(layer).std().item() / init_std(layer) - 1) < 0.02
