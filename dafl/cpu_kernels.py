"""Drop-in layers for two CPU kernels that are slow on LeNet-sized tensors.

Profiling one student step of the default preset on the project's 2-core machine (torch
2.14.1, batch 256, fp32) showed `F.max_pool2d(x, 2)` costing several times what two
elementwise maxima over reshaped views cost, and oneDNN's weight gradient of a convolution
with one input channel (LeNet-5's first conv) costing more than the same sums written as one
convolution over the batch axis. Measurements: `benchmarks/cpu_kernels.md`.

Both layers subclass the torch ones, have the same parameters and state_dict keys and
compute the same values (the weight gradient up to float summation order). They use the
stock kernel on accelerators, under tracing, export or compilation, and for shapes they do
not cover; the max-pool also wherever a gradient is needed, because max_pool2d's backward
(with its saved indices) is fast and an elementwise-max backward costs more than its forward
saves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _plain_path(x: torch.Tensor) -> bool:
    """True where the stock kernel is used: not a CPU tensor, or a tracer/compiler is looking."""
    return (x.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def _window_max(x: torch.Tensor) -> torch.Tensor:
    """2x2, stride-2 max over an NCHW tensor with even height and width."""
    n, c, h, w = x.shape
    rows = torch.maximum(*x.reshape(n, c, h // 2, 2, w).unbind(3))
    return torch.maximum(*rows.reshape(n, c, h // 2, w // 2, 2).unbind(4))


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2) with a faster CPU forward for even-sized NCHW inputs that need no gradient."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if _plain_path(x) or needs_grad or x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            return super().forward(x)
        return _window_max(x.contiguous())


class _SingleChannelConvFunction(torch.autograd.Function):
    """conv2d (stride 1, no padding) whose weight gradient is one conv over the batch axis."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out)
        if ctx.needs_input_grad[1]:
            # dW[o, 0, i, j] = sum_n,y,x g[n, o, y, x] * x[n, 0, y + i, x + j]: the batch becomes
            # the channel axis of a convolution of x (1 "image") with g (o "kernels")
            grad_weight = F.conv2d(x.transpose(0, 1), grad_out.transpose(0, 1)).transpose(0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias


class SingleChannelConv2d(nn.Conv2d):
    """nn.Conv2d for one input channel, with a faster CPU weight gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        covered = (self.in_channels == 1 and self.groups == 1 and self.stride == (1, 1)
                   and self.padding == (0, 0) and self.dilation == (1, 1) and self.padding_mode == "zeros")
        if _plain_path(x) or not covered or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        return _SingleChannelConvFunction.apply(x, self.weight, self.bias)
