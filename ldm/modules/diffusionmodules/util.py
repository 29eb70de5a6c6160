"""Layers and helpers shared by the UNet and the samplers."""
import torch
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


def conv_nd(dims, *args, **kwargs):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def extract_into_tensor(a, t, x_shape):
    """a: (T,), t: (B,) int -> (B, 1, ..., 1) broadcastable against x_shape."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
