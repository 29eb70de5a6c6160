"""The subset of x-transformers that LDM's BERT text encoder uses.

A pre-norm Encoder of alternating self-attention ('a') and feed-forward ('f') layers behind a token
and learned absolute position embedding. Module and parameter names follow the reference so that
LDM checkpoints load strictly (`token_emb`, `pos_emb.emb`, `attn_layers.layers.{i}.{0,1}`, `norm`,
`to_logits`).
"""
import torch
from torch import nn

from ldm.implementation import current
from ldm.modules.attention import attention
from ldm.modules.diffusionmodules.util import checkpoint, linear_recipe, recompute_saved
from ldm.modules.encoders.base import encode_tokens


class AbsolutePositionalEmbedding(nn.Module):
    """Learned position embedding: one row per position."""

    def __init__(self, dim, max_seq_len):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x):
        """x: (B, T, D) -> (1, T, D)"""
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None]


class Attention(nn.Module):
    """Multi-head self-attention without a mask: pad tokens are attended to, as in the reference.

    `Implementation.sdpa` off runs the reference's explicit einsum/softmax (the benchmark baseline).
    """

    def __init__(self, dim, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D); backward projects x again rather than keeping the queries, keys and values
        (each heads * dim_head / D times x's size)."""
        projections = {layer(x): linear_recipe(layer, x) for layer in (self.to_q, self.to_k, self.to_v)}
        with recompute_saved(projections):
            out = attention(*projections, self.heads, current().sdpa)
        return self.to_out(out)


class FeedForward(nn.Module):
    """Linear(d, mult*d), GELU, Dropout, Linear(mult*d, d); indices match the reference (`net.0.0`, `net.2`)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(dropout),
                                 nn.Linear(inner, dim))

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D); backward projects x again rather than keeping the GELU's input (mult * D wide)."""
        (project, gelu), dropout, out = self.net
        h = project(x)
        with recompute_saved({h: linear_recipe(project, x)}):
            h = gelu(h)
        return out(dropout(h))


class Residual(nn.Module):
    """Parameter-free residual add; kept as a module so layer indices match the reference."""

    def forward(self, x, residual):
        return x + residual


class Encoder(nn.Module):
    """`depth` pairs of pre-norm (attention, feed-forward) layers; `layers.{2i}` attends, `layers.{2i+1}` is the FF.

    use_checkpoint: recompute each layer's activations in backward (when grad is on) to save memory.
    """

    def __init__(self, dim, depth, heads=8, dim_head=64, ff_mult=4, use_checkpoint=False):
        super().__init__()
        self.dim = dim
        self.use_checkpoint = use_checkpoint
        self.layer_types = ("a", "f") * depth
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), self._block(kind, dim, heads, dim_head, ff_mult), Residual()])
            for kind in self.layer_types
        )

    @staticmethod
    def _block(kind, dim, heads, dim_head, ff_mult):
        return Attention(dim, heads, dim_head) if kind == "a" else FeedForward(dim, ff_mult)

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D)"""
        for norm, block, residual in self.layers:
            x = residual(checkpoint(lambda h, n=norm, b=block: b(n(h)), (x,), self.use_checkpoint), x)
        return x


class TransformerWrapper(nn.Module):
    """Token + position embedding, Encoder, final LayerNorm; `to_logits` exists only so checkpoints load."""

    def __init__(self, num_tokens, max_seq_len, attn_layers, emb_dropout=0.0):
        super().__init__()
        dim = attn_layers.dim
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, tokens, return_embeddings=True, embedding_manager=None, band=0):
        """tokens: (B, T) int64 -> (B, T, D) embeddings, or (B, T, num_tokens) logits.

        An `embedding_manager` meets the encoder at its seam (`encode_tokens`): it makes the token
        embeddings (before the position embedding) and may edit the final states, with the vectors of its
        timestep band `band` (int or (B,) int64).
        """
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"got {tokens.shape[1]} tokens but the text encoder holds at most {self.max_seq_len}: "
                             "truncate the token ids to max_seq_len")
        x = encode_tokens(tokens, self.token_emb, self.encode_embeddings, embedding_manager, band)
        return x if return_embeddings else self.to_logits(x)

    def encode_embeddings(self, x):
        """x: (B, T, D) token embeddings -> (B, T, D) final states"""
        x = self.emb_dropout(x + self.pos_emb(x))
        return self.norm(self.attn_layers(x))
