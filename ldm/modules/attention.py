"""Cross-attention and the SpatialTransformer of the LDM UNet.

Which way attention, the 1x1 projections and GEGLU run is the active `ldm.implementation.Implementation`'s choice
(ours: scaled_dot_product_attention, matrix products, the lean GEGLU; the reference's: einsum/softmax,
convolutions, autograd's graph).

Inside `reuse_context_projections(store)` (no autograd) each cross-attention layer projects a given context to
keys and values once and reuses them: a sampler conditions every step on the same context. The store is the one
piece of dynamic scope here, and on purpose: a sampler reaches the UNet only through the eps-model contract
`apply_model(x, t, c)` (any object with that method, as the reference's samplers take it), so nothing but x, t
and the context can pass through the call. It is context-local (a ContextVar): two threads sampling at once keep
their own stores.
"""
import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.implementation import current
from ldm.modules.diffusionmodules.util import Conv2d, checkpoint, linear_recipe, recompute_saved


def attention(q, k, v, heads, use_sdpa=True):
    """q: (B, N, H*d), k/v: (B, M, H*d) -> (B, N, H*d); softmax over keys, scale d**-0.5, no mask."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    if use_sdpa:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5)
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
    return rearrange(out, "b h n d -> b n (h d)")


_projections = contextvars.ContextVar("context_projections", default=None)  # {layer: (context, k, v)} or None


@contextlib.contextmanager
def reuse_context_projections(store):
    """Within the block, cross-attention layers keep their keys/values of a context in `store` (a dict the
    caller holds across calls) and reuse them while the same context tensor comes back. Only without autograd."""
    token = _projections.set(store)
    try:
        yield store
    finally:
        _projections.reset(token)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        """x: (B, N, C), context: (B, M, Cc) or None (self-attention) -> (B, N, C).

        For backward, autograd keeps the context rather than its keys and values, and projects it again
        (`recompute_saved`): every cross-attention layer of a UNet shares the one context."""
        if context is None:
            k, v = self.to_k(x), self.to_v(x)
            recipes = {}
        else:
            k, v = self.context_projections(context)
            recipes = {k: linear_recipe(self.to_k, context), v: linear_recipe(self.to_v, context)}
        q = self.to_q(x)
        with recompute_saved(recipes):
            out = attention(q, k, v, self.heads, current().sdpa)
        return self.to_out(out)

    def context_projections(self, context):
        """context: (B, M, Cc) -> keys, values (B, M, H*d); from the active store when it holds this context."""
        store = None if torch.is_grad_enabled() else _projections.get()
        if store is not None and self in store and store[self][0] is context:
            return store[self][1:]
        k, v = self.to_k(context), self.to_v(context)
        if store is not None:
            store[self] = (context, k, v)
        return k, v


class GatedGELU(torch.autograd.Function):
    """h: (..., 2F) -> h[..., :F] * gelu(h[..., F:]), keeping only h for backward.

    Autograd would keep h (the halves are views of it) and gelu(gate) too, half as much again; the
    backward recomputes gelu(gate) instead.
    """

    @staticmethod
    def forward(ctx, h):
        x, gate = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return x * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):
        x, gate = ctx.saved_tensors[0].chunk(2, dim=-1)
        return torch.cat([grad * F.gelu(gate), torch.ops.aten.gelu_backward(grad * x, gate)], dim=-1)


class GEGLU(nn.Module):
    """x: (..., dim_in) -> (..., dim_out), gated by GELU; `Implementation.fused_geglu` off runs the reference's autograd
    graph (the benchmark baseline): the same values, more memory kept for backward."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        h = self.proj(x)
        if current().fused_geglu and torch.is_grad_enabled() and h.requires_grad:
            with recompute_saved({h: linear_recipe(self.proj, x)}):  # h is 2 * dim_out / dim_in times x's size
                return GatedGELU.apply(h)
        x, gate = h.chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.checkpoint)

    def _forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


def zero_module(module):
    for p in module.parameters():
        p.detach().zero_()
    return module


class SpatialTransformer(nn.Module):
    """GN -> 1x1 proj_in -> tokens -> transformer blocks -> 1x1 proj_out (zero-init) -> + input.

    The 1x1 projections run as matrix products on the (B, H*W, C) tokens: the same weights without a
    convolution's layout work; `Implementation.linear_projections` off runs them as the reference's convolutions
    (the benchmark baseline). use_linear (SD 2.x's use_linear_in_transformer) stores them as nn.Linear, weights
    (C_out, C_in) instead of (C_out, C_in, 1, 1): the same function.
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None, checkpoint=True,
                 use_linear=False):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim, checkpoint) for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Linear(inner, in_channels) if use_linear else Conv2d(inner, in_channels, 1))

    def forward(self, x, context=None):
        """x: (B, C, H, W), context: (B, M, Cc) -> (B, C, H, W)."""
        _, _, h, w = x.shape
        h_ = self._pointwise(self.proj_in, rearrange(self.norm(x), "b c h w -> b (h w) c"), h, w)
        for block in self.transformer_blocks:
            h_ = block(h_, context=context)
        return rearrange(self._pointwise(self.proj_out, h_, h, w), "b (h w) c -> b c h w", h=h, w=w) + x

    def _pointwise(self, conv, tokens, h, w):
        """tokens: (B, H*W, C_in) -> (B, H*W, C_out) through `conv`, a 1x1 convolution or an nn.Linear."""
        if current().linear_projections or isinstance(conv, nn.Linear):
            return F.linear(tokens, conv.weight.flatten(1), conv.bias)
        return rearrange(conv(rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)), "b c h w -> b (h w) c")


def timestep_embedding(timesteps, dim, max_period=10000):
    """timesteps: (B,) -> (B, dim) = cat([cos(t f), sin(t f)]), f_i = exp(-ln(max_period) i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
