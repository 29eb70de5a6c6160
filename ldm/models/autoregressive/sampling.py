"""Sampling image codes from the image-token transformers: classifier-free guidance, temperature, top-k, top-p;
raster order one code at a time (sample_codes), next-scale one scale at a time (sample_scales)."""
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


def draw(logits, scale, temperature, top_k, top_p, generator):
    """logits: (2B or B, n, K), conditional half first when scale != 1 -> codes (B, n) int64.

    With guidance the logits are u + scale (c - u); then temperature, top-k and top-p, and one draw per position.
    """
    if scale != 1.0:
        cond, uncond = logits.chunk(2)
        logits = uncond + scale * (cond - uncond)
    B, n, K = logits.shape
    probs = filter_logits(logits.reshape(B * n, K).float() / max(temperature, 1e-6), top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).view(B, n)


def guidance_caches(transformer, context, null_context, scale):
    """-> (caches, halves): caches of the text and, with guidance (scale != 1), of the unconditional context as a
    second half of the batch; halves is 2 with guidance, else 1."""
    if scale == 1.0:
        return transformer.start_cache(context), 1
    return transformer.start_cache(torch.cat([context, null_context.expand_as(context)])), 2


@torch.no_grad()
def sample_codes(transformer, context, null_context, scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                 generator=None, callback=None):
    """context: (B, T, D) text states, null_context: (1, 1, D) -> codes (B, n_positions) int64, raster order.

    With guidance the conditional and unconditional halves run as one batch of 2B through cached
    keys and values; logits are u + scale (c - u).
    """
    caches, halves = guidance_caches(transformer, context, null_context, scale)
    codes, last = [], None
    for i in range(transformer.n_positions):
        logits = transformer.step(None if last is None else last.repeat(halves), caches)
        last = draw(logits[:, None], scale, temperature, top_k, top_p, generator)[:, 0]
        codes.append(last)
        if callback is not None:
            callback(i)
    return torch.stack(codes, dim=1)


@torch.no_grad()
def sample_scales(transformer, quantizer, context, null_context, scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                  generator=None, callback=None):
    """Next-scale sampling: context (B, T, D), null_context (1, 1, D) -> codes (B, N) int64, coarsest scale first.

    Each scale's codes are drawn together from its logits; the sum of the scales so far, resized to the next
    scale (MultiScaleQuantizer), is the next step's input. callback(k) after each scale.
    """
    caches, halves = guidance_caches(transformer, context, null_context, scale)
    f_hat, codes, inputs = quantizer.empty_features(context), [], None
    for k, s in enumerate(quantizer.scales):
        idx = draw(transformer.step(inputs, caches), scale, temperature, top_k, top_p, generator)
        codes.append(idx)
        if k + 1 < len(quantizer.scales):
            f_hat = quantizer.add_scale(f_hat, idx.view(-1, s, s), k)
            inputs = quantizer.resized(f_hat, k + 1).repeat(halves, 1, 1)
        if callback is not None:
            callback(k)
    return torch.cat(codes, dim=1)
