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


@torch.no_grad()
def sample_codes(transformer, context, null_context, scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                 generator=None, callback=None):
    """context: (B, T, D) text states, null_context: (1, 1, D) -> codes (B, n_positions) int64, raster order.

    With guidance the conditional and unconditional halves run as one batch of 2B through cached
    keys and values; logits are u + scale (c - u).
    """
    B = context.shape[0]
    guided = scale != 1.0
    caches = transformer.start_cache(torch.cat([context, null_context.expand_as(context)]) if guided else context)
    codes, last = [], None
    for i in range(transformer.n_positions):
        logits = transformer.step(None if last is None else (last.repeat(2) if guided else last), caches)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + scale * (cond - uncond)
        probs = filter_logits(logits.float() / max(temperature, 1e-6), top_k, top_p).softmax(-1)
        last = torch.multinomial(probs, 1, generator=generator)[:, 0]
        codes.append(last)
        if callback is not None:
            callback(i)
    return torch.stack(codes, dim=1)
