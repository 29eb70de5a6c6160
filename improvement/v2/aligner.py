"""The v2 aligner: multilingual token states -> the English LDM BERT's input, position by position.

    states (B, L, H) --proj--> memory (B, L, d)
    queries (T, d) --[self-attention, cross-attention to memory, feed-forward] x depth--> (B, T, d)
    --head--> logits (B, T, V) over `target_ids`, V English BERT ids (the world's words, [PAD], `*`)

The frozen LDM BERT then encodes `softmax(logits) @ token_emb[target_ids]` (decode "soft") or the
embeddings of the argmax ids (decode "hard"); the argmax ids mark where a placeholder stands, so a
learned `*` is written there exactly as for an English prompt. T = 77 English positions, so the
BERT's conditioning (B, 77, D) comes out in the English order, whatever the source word order.
"""
import torch
import torch.nn.functional as F
from torch import nn


class CrossBlock(nn.Module):
    """Pre-norm self-attention over the queries, cross-attention to the memory, feed-forward."""

    def __init__(self, dim, heads, ff_mult=4):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, q, memory, memory_pad):
        """q: (B, T, d), memory: (B, L, d), memory_pad: (B, L) bool, True at padding -> (B, T, d)"""
        h = self.norms[0](q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.norms[1](q), memory, memory, key_padding_mask=memory_pad, need_weights=False)[0]
        return q + self.ff(self.norms[2](q))


class Aligner(nn.Module):
    """Maps (B, L, in_dim) source states to (B, T, V) logits over the English ids `target_ids` (V,)."""

    def __init__(self, in_dim, target_ids, dim=128, depth=2, heads=4, max_seq_len=77):
        super().__init__()
        self.register_buffer("target_ids", torch.as_tensor(target_ids, dtype=torch.long))
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))
        self.source_pos = nn.Embedding(512, dim)
        self.queries = nn.Parameter(torch.randn(max_seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList([CrossBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(self.target_ids))

    def forward(self, states, attention_mask):
        """states: (B, L, in_dim), attention_mask: (B, L) 1 at real tokens -> logits (B, T, V)"""
        B, L, _ = states.shape
        memory = self.proj(states) + self.source_pos(torch.arange(L, device=states.device))[None]
        q = self.queries[None].expand(B, -1, -1)
        for block in self.blocks:
            q = block(q, memory, attention_mask == 0)
        return self.head(self.norm(q))

    def target_index(self, english_ids):
        """english_ids: (B, T) BERT ids -> (B, T) indices into target_ids; ids outside it are an error."""
        lookup = torch.full((int(self.target_ids.max()) + 1,), -1, dtype=torch.long, device=english_ids.device)
        lookup[self.target_ids] = torch.arange(len(self.target_ids), device=english_ids.device)
        index = lookup[english_ids.clamp(max=len(lookup) - 1)]
        missing = (index < 0) | (english_ids >= len(lookup))
        if missing.any():
            raise ValueError(f"English token id {int(english_ids[missing][0])} is not among the aligner's "
                             f"{len(self.target_ids)} target ids: rebuild the aligner with a corpus that holds it")
        return index

    def decode(self, logits, token_embedding, mode="soft"):
        """logits: (B, T, V), token_embedding: the English BERT's nn.Embedding ->
        ids (B, T) int64 (argmax, in BERT's vocabulary), embeds (B, T, D) for the BERT body."""
        ids = self.target_ids[logits.argmax(-1)]
        table = token_embedding(self.target_ids)  # (V, D)
        if mode == "hard":
            return ids, table[logits.argmax(-1)]
        if mode == "soft":
            return ids, logits.softmax(-1) @ table
        raise ValueError(f"unknown aligner decode '{mode}': use soft or hard")


def alignment_losses(aligned, target, logits=None, target_index=None):
    """aligned, target: (B, T, D) conditioning -> {"mse", "cos", ("ce")}: mean squared error, mean (1 - cosine)
    over positions, and the cross-entropy of logits (B, T, V) against target_index (B, T) when given."""
    losses = {"mse": F.mse_loss(aligned, target),
              "cos": (1 - F.cosine_similarity(aligned, target, dim=-1)).mean()}
    if logits is not None:
        losses["ce"] = F.cross_entropy(logits.flatten(0, 1), target_index.flatten())
    return losses
