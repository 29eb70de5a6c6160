"""Where a placeholder's vectors go in rows of token ids; positions are found by id, never by arithmetic.

A placeholder has one id per vector: `(tok, tok_1, ..., tok_{n-1})` when it was registered as new
tokens, or one vocabulary id repeated n times (the reference's '*').
"""
import torch


def expand_occurrences(tokens, ids, k):
    """tokens: (B, T) int64, edited in place; ids: the placeholder's ids; k: vectors in use -> src (B, T) int64.

    Every occurrence of ids[0] becomes ids[:k]; later tokens shift right and each row is cut back to T
    (what the reference's right-to-left insertion gives). src[b, p] is the old position that new
    position p came from, so `x.gather(1, src)` moves per-position data the same way.
    """
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device)
    is_first = tokens == ids[0]
    counts = torch.where(is_first, k, 1)
    ends = counts.cumsum(1)  # old position j fills new positions [ends[j] - counts[j], ends[j])
    src = torch.searchsorted(ends, positions.expand_as(tokens).contiguous(), right=True)
    offset = positions - (ends - counts).gather(1, src)  # (B, T) place within its group
    group = torch.tensor(ids[:k], device=tokens.device)
    tokens.copy_(torch.where(is_first.gather(1, src), group[offset], tokens.gather(1, src)))
    return src


def vector_slots(tokens, ids, k):
    """tokens: (B, T) int64 -> (B, T) int64: which of the first k vectors sits at each position, -1 elsewhere.

    Registered tokens name their vector by id. A repeated vocabulary id is counted along each run of
    it (k positions per occurrence after expansion; adjacent occurrences make one longer run).
    """
    if len(set(ids)) == len(ids):
        slots = torch.full_like(tokens, -1)
        for i, token in enumerate(ids[:k]):
            slots = slots.masked_fill(tokens == token, i)
        return slots
    is_token = tokens == ids[0]
    count = is_token.cumsum(1)
    offset = count - torch.where(is_token, 0, count).cummax(1).values - 1
    return torch.where(is_token, offset % k, -1)


def write_vectors(tokens, x, ids, vectors):
    """tokens: (B, T), x: (B, T, D), vectors: (k, D), or (B, k, D) for each row its own
    -> (B, T, D) with vector i at the positions of slot i."""
    slots = vector_slots(tokens, ids, vectors.shape[-2])
    at = slots.clamp(min=0)
    rows = vectors[at] if vectors.dim() == 2 else vectors[torch.arange(len(at), device=at.device)[:, None], at]
    return torch.where((slots >= 0)[..., None], rows, x)
