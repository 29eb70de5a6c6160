"""Sampling throughput at equal steps: ours vs separate conditional/unconditional forwards.

    python bench/sample.py                       # the shipped tiny model, DDIM 50 steps, guidance 3
    python bench/sample.py --config configs/bench/mid.yaml --device cuda

Variants, interleaved in one process on the same start noise:
- ours: classifier-free guidance as one batched forward, SDPA attention, 1x1 projections as matrix products,
  each step conditioned on its timestep band's context (as txt2img samples);
- separate: two forwards per step (unconditional, then conditional), einsum/softmax attention in fp32;
- batched einsum: the reference DDIM sampler's real behaviour (one batched forward, einsum attention).
"""
import argparse

import torch

from bench.common import build, implementation, load_config, median, timed
from ldm.models.diffusion.sampling import ddim_schedule, guided_eps, sample_ddim

DEFAULT_CONFIG = ["models/ldm/tiny-shapes/config.yaml", "configs/tiny-shapes/finetune.yaml"]
DEFAULT_CKPT = "models/ldm/tiny-shapes/model.safetensors"


def separate_eps(model, c, uc, scale):
    """Guidance with two UNet forwards per step."""
    def eps_fn(x, t):
        e_uc, e_c = model.apply_model(x, t, uc), model.apply_model(x, t, c)
        return e_uc + scale * (e_c - e_uc)
    return eps_fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=DEFAULT_CONFIG)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=8, help="images per batch")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    ckpt = args.ckpt if args.ckpt is not None else (DEFAULT_CKPT if args.config == DEFAULT_CONFIG else "")
    model = build(load_config(args.config, args.overrides), ckpt, True, args.device).eval()
    shape = (args.n, model.channels, model.image_size, model.image_size)
    sched = ddim_schedule(model.alphas_cumprod, args.steps)
    with torch.no_grad():
        bands = model.banded_conditioning(["a photo of a *"] * args.n)  # one context per timestep band, as txt2img
        c, uc = bands[0], model.get_learned_conditioning([""] * args.n)  # the original's one set of vectors
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(args.device)
        variants = {
            "ours": (True, guided_eps(model, bands, uc, args.scale)),
            "separate": (False, separate_eps(model, c, uc, args.scale)),
            "batched einsum": (False, guided_eps(model, c, uc, args.scale)),
        }
        times, outs = {k: [] for k in variants}, {}
        for r in range(args.repeats + 1):
            for name, (sdpa, eps_fn) in variants.items():
                with implementation(sdpa):
                    ms = timed(lambda: outs.__setitem__(name, sample_ddim(eps_fn, x_T, sched)), args.device)
                if r:
                    times[name].append(ms)
    print(f"DDIM {args.steps} steps, guidance {args.scale}, batch {args.n}, {args.device}, {' + '.join(args.config)}")
    base = args.n / (median(times["separate"]) / 1000)
    for name, ms in times.items():
        ips = args.n / (median(ms) / 1000)
        diff = (outs[name] - outs["ours"]).abs().max().item()
        print(f"{name:16}{ips:10.2f} images/s   {ips / base:5.2f}x vs separate   max |x0 - ours| {diff:.2e}")


if __name__ == "__main__":
    main()
