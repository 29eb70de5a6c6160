"""Image-token transformers conditioned on text states by cross-attention: raster order (ImageTokenTransformer)
and next-scale (NextScaleTransformer).

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

    def attend(self, x, k, v, causal=False, mask=None):
        """x: (B, n, d) queries against k, v: (B, heads, m, e) -> (B, n, d); mask: (n, m) bool, True = may attend"""
        q = rearrange(self.to_q(x), "b n (h e) -> b h n e", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))

    def forward(self, x, kv=None, causal=False, mask=None):
        """x: (B, n, d), kv: (B, m, kv_dim) -> (B, n, d)"""
        return self.attend(x, *self.keys_values(x if kv is None else kv), causal=causal, mask=mask)


class Block(nn.Module):
    """Pre-norm self-attention (causal, or as `mask` allows), cross-attention to the text, feed-forward."""

    def __init__(self, dim, heads, context_dim, ff_mult=4, dropout=0.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads)
        self.cross_attn = MultiHeadAttention(dim, heads, kv_dim=context_dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * dim, dim))

    def forward(self, x, context, mask=None):
        x = x + self.self_attn(self.norm1(x), causal=mask is None, mask=mask)
        x = x + self.cross_attn(self.norm2(x), kv=context)
        return x + self.ff(self.norm3(x))

    def step(self, x, cache):
        """x: (B, n, d), the newest positions, which see each other and every earlier one; cache: {"k", "v"} of
        earlier positions (grown in place), {"ck", "cv"} of the context -> (B, n, d)"""
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        x = x + self.self_attn.attend(h, k, v)
        x = x + self.cross_attn.attend(self.norm2(x), cache["ck"], cache["cv"])
        return x + self.ff(self.norm3(x))


class BlockStack(nn.Module):
    """depth Blocks, a final norm and the logits head over n_codes; incremental decoding with per-block caches."""

    def __init__(self, n_codes, context_dim, dim, depth, heads, ff_mult, dropout):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, context_dim, ff_mult, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_codes)

    def logits(self, x, context, mask=None):
        """x: (B, n, dim) embedded positions -> (B, n, n_codes); causal unless `mask` (n, n) says otherwise"""
        for block in self.blocks:
            x = block(x, context, mask=mask)
        return self.head(self.norm(x))

    def start_cache(self, context):
        """Per-block caches holding the context's cross-attention keys and values; context: (B, T, context_dim)."""
        return [dict(zip(("ck", "cv"), block.cross_attn.keys_values(context))) for block in self.blocks]

    @staticmethod
    def cached_length(caches):
        return caches[0]["k"].shape[2] if "k" in caches[0] else 0

    def step_logits(self, x, caches):
        """x: (B, n, dim) the newest embedded positions -> (B, n, n_codes), the caches grown by them"""
        for block, cache in zip(self.blocks, caches):
            x = block.step(x, cache)
        return self.head(self.norm(x))


class ImageTokenTransformer(BlockStack):
    """Next-code logits over a codebook of n_codes for an image of n_positions codes in raster order."""

    def __init__(self, n_codes, n_positions, context_dim, dim=128, depth=4, heads=4, ff_mult=4, dropout=0.0):
        super().__init__(n_codes, context_dim, dim, depth, heads, ff_mult, dropout)
        self.n_codes, self.n_positions = n_codes, n_positions
        self.code_emb = nn.Embedding(n_codes, dim)
        self.sos = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb = nn.Parameter(torch.randn(1, n_positions, dim) * 0.02)

    def forward(self, prefix, context):
        """prefix: (B, n) int64 codes, n < n_positions; context: (B, T, context_dim) -> logits (B, n + 1, n_codes)"""
        B, n = prefix.shape
        if n >= self.n_positions:
            raise ValueError(f"a prefix of {n} codes leaves nothing to predict: at most {self.n_positions - 1}")
        x = torch.cat([self.sos.expand(B, -1, -1), self.code_emb(prefix)], dim=1) + self.pos_emb[:, :n + 1]
        return self.logits(x, context)

    def step(self, last_code, caches):
        """Logits (B, n_codes) of the next position; last_code: (B,) int64, or None at the first position."""
        i, B = self.cached_length(caches), caches[0]["ck"].shape[0]
        x = self.sos.expand(B, -1, -1) if last_code is None else self.code_emb(last_code)[:, None]
        return self.step_logits(x + self.pos_emb[:, i:i + 1], caches)[:, 0]


class NextScaleTransformer(BlockStack):
    """Next-scale (VAR-style) logits over a codebook of n_codes for token maps of sides `scales`, coarsest first.

        [sos] + inputs (B, N - 1, code_dim), the coarser scales' sum resized to each later scale (see
        MultiScaleQuantizer.next_scale_inputs) --embed, + position + scale embeddings-->
        [self-attention within a scale and to coarser ones, cross-attention, feed-forward] x depth --> (B, N, K)

    A scale's codes are predicted together from the text and the coarser scales only, so every code of the
    finest map hears the text directly (in raster order the codes before it already say most of it).
    """

    def __init__(self, n_codes, scales, code_dim, context_dim, dim=128, depth=4, heads=4, ff_mult=4, dropout=0.0):
        super().__init__(n_codes, context_dim, dim, depth, heads, ff_mult, dropout)
        self.n_codes, self.scales = n_codes, tuple(scales)
        self.n_positions = sum(s * s for s in self.scales)
        level = torch.cat([torch.full((s * s,), k) for k, s in enumerate(self.scales)])
        self.register_buffer("level", level, persistent=False)
        self.register_buffer("mask", level[:, None] >= level[None, :], persistent=False)  # (N, N) block-causal
        self.sos = nn.Parameter(torch.zeros(1, 1, dim))
        self.code_in = nn.Linear(code_dim, dim)
        self.pos_emb = nn.Parameter(torch.randn(1, self.n_positions, dim) * 0.02)
        self.level_emb = nn.Embedding(len(self.scales), dim)

    def embed(self, tokens, start):
        """tokens: (B, n, dim) of positions start.. -> with their position and scale embeddings added"""
        positions = slice(start, start + tokens.shape[1])
        return tokens + self.pos_emb[:, positions] + self.level_emb(self.level[positions])

    def forward(self, inputs, context):
        """inputs: (B, N - 1, code_dim); context: (B, T, context_dim) -> logits (B, N, n_codes), every scale at once"""
        x = torch.cat([self.sos.expand(inputs.shape[0], -1, -1), self.code_in(inputs)], dim=1)
        return self.logits(self.embed(x, 0), context, mask=self.mask)

    def step(self, inputs, caches):
        """Logits (B, s * s, n_codes) of the next scale; inputs: (B, s * s, code_dim), or None at the first scale."""
        start, B = self.cached_length(caches), caches[0]["ck"].shape[0]
        x = self.sos.expand(B, -1, -1) if inputs is None else self.code_in(inputs)
        return self.step_logits(self.embed(x, start), caches)
