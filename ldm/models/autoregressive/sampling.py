"""Sampling image codes from an ImageTokenTransformer: classifier-free guidance, temperature, top-k, top-p."""
import torch


def filter_logits(logits, top_k=0, top_p=1.0):
    """logits: (B, K) -> (B, K) with all but the top_k largest, and the tail past cumulative mass top_p, at -inf.

    top_k=0 and top_p=1.0 keep everything; the most likely code always survives.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass = sorted_logits.softmax(-1).cumsum(-1)
        drop = mass - sorted_logits.softmax(-1) >= top_p  # codes entirely past the nucleus
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def guided_logits(transformer, prefix, context, null_context, scale):
    """Next-code logits (B, K) with classifier-free guidance u + s (c - u), both halves in one forward."""
    if scale == 1.0:
        return transformer(prefix, context)[:, -1]
    both = transformer(torch.cat([prefix, prefix]), torch.cat([context, null_context.expand_as(context)]))[:, -1]
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_codes(transformer, context, null_context, scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                 generator=None, callback=None):
    """context: (B, T, D) text states, null_context: (1, 1, D) -> codes (B, n_positions) int64, raster order."""
    B = context.shape[0]
    codes = torch.zeros(B, 0, dtype=torch.long, device=context.device)
    for i in range(transformer.n_positions):
        logits = guided_logits(transformer, codes, context, null_context, scale) / max(temperature, 1e-6)
        probs = filter_logits(logits.float(), top_k, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        codes = torch.cat([codes, nxt], dim=1)
        if callback is not None:
            callback(i)
    return codes
