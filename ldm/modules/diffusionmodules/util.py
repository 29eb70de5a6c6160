"""Layers and helpers shared by the UNet and the samplers.

`keeping_saved()` is a dynamic scope on purpose: it must reach whatever code `checkpoint` runs, which autograd
runs again inside backward, as torch.utils.checkpoint's own saved-tensor hooks do; no argument reaches there.
It is thread-local (a region that backward re-runs enters it again in its own thread), and a threading.local
because torch.compile traces its writes inside a checkpointed region (it breaks the graph at a ContextVar's).
"""
import contextlib
import functools
import threading

import torch
import torch.autograd.graph
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ldm.implementation import current
from ldm.util import autocast_dtype

_local = threading.local()  # .keep: how many keeping_saved blocks this thread is inside


def checkpoint(fn, inputs, flag):
    """Run `fn(*inputs)`, recomputing activations in backward when `flag` is set and grad is on."""
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_checkpointed, fn, *inputs, use_reentrant=False)
    return fn(*inputs)


def _checkpointed(fn, *inputs):
    with keeping_saved():  # a checkpointed region keeps nothing for backward: recipes would only repeat work
        return fn(*inputs)


@contextlib.contextmanager
def keeping_saved():
    """Inside the block `recompute_saved` stands aside: autograd keeps the tensors it saves."""
    depth = getattr(_local, "keep", 0)
    _local.keep = depth + 1
    try:
        yield
    finally:
        _local.keep = depth


@contextlib.contextmanager
def recompute_saved(recipes):
    """Autograd keeps each tensor of `recipes` that an operation inside the block saves for backward (or a view of
    one) as its recipe, and backward runs the recipe to make it again.

    recipes: {tensor: fn}; `fn`, a functools.partial over tensors smaller than the one it makes or alive anyway (a
    projection of its input, say: `linear_recipe`), repeats the computation that made the tensor, so it gives the
    same values bit for bit, under the autocast of the forward. An input modified in place in between is an error,
    as for any tensor autograd keeps. Inside `keeping_saved()` the tensors are kept.
    """
    if getattr(_local, "keep", 0) or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    by_id = {id(_root(t)): fn for t, fn in recipes.items()}
    # the recipes' tensors were made under the autocast of the block's start (inside an operation it reads as off)
    autocast = {t.device.type: autocast_dtype(t.device.type) for t in recipes}

    def pack(t):
        base = _root(t)
        fn = by_id.get(id(base))
        if fn is None:
            return t
        device = t.device.type
        return (fn, _versions(fn), device, autocast.get(device), t.size(), t.stride(),
                t.storage_offset() - base.storage_offset())

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack_recipe):
        yield


def _root(t):
    """The tensor that owns t's memory: t, or the one it is a view of (fn() makes a new one like it)."""
    return t if t._base is None else t._base


def _unpack_recipe(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    fn, versions, device, autocast, size, stride, offset = packed
    if _versions(fn) != versions:
        raise RuntimeError("an input of a tensor that autograd recomputes for backward was modified in place after "
                           "the forward: keep the tensor instead (keeping_saved(), or the model's "
                           "recompute_projections=false)")
    # values only: autograd links the tensor it gets back to the graph (create_graph=True included)
    with torch.no_grad(), torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
        return fn().as_strided(size, stride, offset)


def _versions(recipe):
    return [a._version for a in recipe.args if isinstance(a, torch.Tensor)]


def linear_recipe(layer, x):
    """The recipe of `layer(x)` for an nn.Linear `layer` (its forward, without the module call)."""
    return functools.partial(F.linear, x, layer.weight, layer.bias)


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
    custom backward's Python overhead costs more than they do); `Implementation.lean_conv` off turns it off."""
    lean_min_numel = 2 ** 18  # 1 MiB in float32

    def forward(self, x):
        frozen = not any(p.requires_grad for p in (self.weight, self.bias) if p is not None)
        lean = current().lean_conv and frozen and x.requires_grad and torch.is_grad_enabled()
        if lean and x.numel() >= self.lean_min_numel and self.padding_mode == "zeros" \
                and not isinstance(self.padding, str):
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
