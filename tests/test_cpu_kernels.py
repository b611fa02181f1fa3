"""The CPU-path layers of dafl.cpu_kernels compute what the torch layers they replace compute."""
import pytest
import torch
from torch import nn

from dafl.cpu_kernels import MaxPool2x2, SingleChannelConv2d
from dafl.models import build_model


@pytest.mark.parametrize("shape", [(4, 3, 28, 28), (2, 16, 10, 10), (3, 2, 9, 12), (1, 1, 7, 7)])
def test_max_pool_matches_torch_without_gradient(shape):
    x = torch.randn(*shape)
    x[0, 0, :2, :2] = 0.5  # a tie inside one window
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(x), nn.MaxPool2d(2)(x))


def test_max_pool_gradient_matches_torch():
    x = torch.randn(4, 6, 28, 28).relu().requires_grad_()
    grad_out = torch.randn(4, 6, 14, 14)
    MaxPool2x2()(x).backward(grad_out)
    ours = x.grad.clone()
    x.grad = None
    nn.MaxPool2d(2)(x).backward(grad_out)
    assert torch.equal(ours, x.grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_single_channel_conv_matches_torch(bias, input_grad):
    torch.manual_seed(0)
    ours, reference = SingleChannelConv2d(1, 3, 5, bias=bias), nn.Conv2d(1, 3, 5, bias=bias)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(8, 1, 32, 32)
    grad_out = torch.randn(8, 3, 28, 28)
    grads = []
    for layer in (ours, reference):
        inp = x.clone().requires_grad_(input_grad)
        out = layer(inp)
        out.backward(grad_out)
        grads.append((out, [p.grad for p in layer.parameters()], inp.grad))
    (out_a, params_a, input_a), (out_b, params_b, input_b) = grads
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(params_a, params_b):  # sums of 6,272 products, in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    if input_grad:
        torch.testing.assert_close(input_a, input_b)
    else:
        assert input_a is None


def test_conv_with_several_input_channels_is_plain_conv():
    torch.manual_seed(0)
    ours, reference = SingleChannelConv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 8, 8)
    ours(x).sum().backward(); reference(x).sum().backward()
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)


def test_lenet_keeps_its_state_dict_keys():
    # checkpoints written before these layers existed must still load
    keys = set(build_model("lenet5_bn").state_dict())
    assert "features.0.weight" in keys and "features.4.weight" in keys and "features.1.running_mean" in keys
    assert not any(k.startswith("features.3") or k.startswith("features.7") for k in keys)
