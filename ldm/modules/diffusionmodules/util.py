"""Layers and helpers shared by the UNet and the samplers."""
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def checkpoint(fn, inputs, flag):
    """Run `fn(*inputs)`, recomputing activations in backward when `flag` is set and grad is on."""
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False)
    return fn(*inputs)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as the reference UNet)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


class _InputOnlyConv2d(torch.autograd.Function):
    """conv2d whose backward computes the input's gradient alone: it keeps the weight, not the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        return torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups), *(None,) * 6


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) that does not keep its input for backward while its
    parameters are frozen: their gradient is not needed, and the input's needs only the weight. Autograd's
    convolution keeps the input either way. Inputs under `lean_min_numel` elements are left to autograd (the
    custom backward's Python overhead costs more than they do); `Conv2d.lean = False` turns it off."""
    lean = True
    lean_min_numel = 2 ** 18  # 1 MiB in float32

    def forward(self, x):
        frozen = not any(p.requires_grad for p in (self.weight, self.bias) if p is not None)
        if self.lean and frozen and x.requires_grad and torch.is_grad_enabled() and x.numel() >= self.lean_min_numel \
                and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return _InputOnlyConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                          self.groups)
        return super().forward(x)


def conv_nd(dims, *args, **kwargs):
    return {1: nn.Conv1d, 2: Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def extract_into_tensor(a, t, x_shape):
    """a: (T,), t: (B,) int -> (B, 1, ..., 1) broadcastable against x_shape."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
