"""A raster-order image-token transformer conditioned on text states by cross-attention.

    prefix (B, n) codes --embed, [sos] + positions--> (B, n+1, d)
        --[causal self-attention, cross-attention to context, feed-forward] x depth--> logits (B, n+1, K)

Position i of the output predicts code i from codes < i and the text, so `forward(codes[:, :-1])`
gives the next-token logits of every position at once (teacher forcing); `step` feeds one code at a time
with cached keys and values (sampling), with the same logits.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class MultiHeadAttention(nn.Module):
    """Attention through scaled_dot_product_attention; `kv` defaults to `x` (self-attention)."""

    def __init__(self, dim, heads, kv_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def keys_values(self, kv):
        """kv: (B, m, kv_dim) -> k, v: (B, heads, m, e)"""
        k, v = self.to_kv(kv).chunk(2, dim=-1)
        return (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in (k, v))

    def attend(self, x, k, v, causal=False):
        """x: (B, n, d) queries against k, v: (B, heads, m, e) -> (B, n, d)"""
        q = rearrange(self.to_q(x), "b n (h e) -> b h n e", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))

    def forward(self, x, kv=None, causal=False):
        """x: (B, n, d), kv: (B, m, kv_dim) -> (B, n, d)"""
        return self.attend(x, *self.keys_values(x if kv is None else kv), causal=causal)


class Block(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim, heads, context_dim, ff_mult=4, dropout=0.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads)
        self.cross_attn = MultiHeadAttention(dim, heads, kv_dim=context_dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * dim, dim))

    def forward(self, x, context):
        x = x + self.self_attn(self.norm1(x), causal=True)
        x = x + self.cross_attn(self.norm2(x), kv=context)
        return x + self.ff(self.norm3(x))

    def step(self, x, cache):
        """x: (B, 1, d), the newest position; cache: {"k", "v"} of earlier positions (grown in place),
        {"ck", "cv"} of the context -> (B, 1, d)"""
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        x = x + self.self_attn.attend(h, k, v)
        x = x + self.cross_attn.attend(self.norm2(x), cache["ck"], cache["cv"])
        return x + self.ff(self.norm3(x))


class ImageTokenTransformer(nn.Module):
    """Next-code logits over a codebook of n_codes for an image of n_positions codes in raster order."""

    def __init__(self, n_codes, n_positions, context_dim, dim=128, depth=4, heads=4, ff_mult=4, dropout=0.0):
        super().__init__()
        self.n_codes, self.n_positions = n_codes, n_positions
        self.code_emb = nn.Embedding(n_codes, dim)
        self.sos = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb = nn.Parameter(torch.randn(1, n_positions, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, context_dim, ff_mult, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_codes)

    def forward(self, prefix, context):
        """prefix: (B, n) int64 codes, n < n_positions; context: (B, T, context_dim) -> logits (B, n + 1, n_codes)"""
        B, n = prefix.shape
        if n >= self.n_positions:
            raise ValueError(f"a prefix of {n} codes leaves nothing to predict: at most {self.n_positions - 1}")
        x = torch.cat([self.sos.expand(B, -1, -1), self.code_emb(prefix)], dim=1) + self.pos_emb[:, :n + 1]
        for block in self.blocks:
            x = block(x, context)
        return self.head(self.norm(x))

    def start_cache(self, context):
        """Per-block caches holding the context's cross-attention keys and values; context: (B, T, context_dim)."""
        return [dict(zip(("ck", "cv"), block.cross_attn.keys_values(context))) for block in self.blocks]

    def step(self, last_code, caches):
        """Logits (B, n_codes) of the next position; last_code: (B,) int64, or None at the first position."""
        i = caches[0]["k"].shape[2] if "k" in caches[0] else 0
        B = caches[0]["ck"].shape[0]
        x = self.sos.expand(B, -1, -1) if last_code is None else self.code_emb(last_code)[:, None]
        x = x + self.pos_emb[:, i:i + 1]
        for block, cache in zip(self.blocks, caches):
            x = block.step(x, cache)
        return self.head(self.norm(x))[:, 0]
