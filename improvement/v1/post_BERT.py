"""Improvement v1: an adapter and a transformer block on top of the LDM BERT embedder.

    context = post_block(adapter(bert(text)))          (B, 77, D) -> (B, 77, D)

Both start as the identity (their output projections are zero), so a v1 model built on a base
checkpoint conditions the UNet exactly as the base model until they train. Which of embedding,
adapter and block train, and at which learning rates, is the LatentDiffusion's `trainable_modules`
and `train_embedding` in the config (configs/improvement/v1-*.yaml).
"""
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.modules import BERTEmbedder
from ldm.modules.x_transformer import Attention, FeedForward


class Adapter(nn.Module):
    """Residual bottleneck MLP: h + up(gelu(down(norm(h)))); `up` starts at zero."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        """h: (B, T, D) -> (B, T, D)"""
        return h + self.up(F.gelu(self.down(self.norm(h))))


class PostBlock(nn.Module):
    """A pre-norm transformer block (self-attention, feed-forward) whose output projections start at zero."""

    def __init__(self, dim, heads=4, dim_head=32, ff_mult=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)
        for last in (self.attn.to_out, self.ff.net[2]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, h):
        """h: (B, T, D) -> (B, T, D)"""
        h = h + self.attn(self.norm1(h))
        return h + self.ff(self.norm2(h))


class PostBERTEmbedder(BERTEmbedder):
    """BERTEmbedder whose output goes through `adapter` and `post_block`.

    State-dict keys: the BERT's own (`transformer.*`, so LDM checkpoints load into it strictly)
    plus `adapter.*` and `post_block.*`, which base checkpoints lack (`new_parameter_prefixes`).
    """

    new_parameter_prefixes = ("adapter.", "post_block.")

    def __init__(self, n_embed, n_layer, adapter_dim=32, block_heads=4, block_dim_head=16, **bert_options):
        super().__init__(n_embed, n_layer, **bert_options)
        self.adapter = Adapter(n_embed, adapter_dim)
        self.post_block = PostBlock(n_embed, block_heads, block_dim_head)

    def forward(self, text, embedding_manager=None, band=0):
        """text: list of B str -> (B, T, n_embed); band: the manager's timestep band (int or (B,) int64)"""
        return self.post_block(self.adapter(super().forward(text, embedding_manager=embedding_manager, band=band)))
