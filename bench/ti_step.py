"""One textual-inversion training step, ours vs the original code's way, interleaved in one process.

    python bench/ti_step.py                                   # the shipped tiny model
    python bench/ti_step.py --config configs/bench/mid.yaml   # mid-size, random init
    python bench/ti_step.py --config configs/latent-diffusion/txt2img-1p4B-finetune.yaml --device cuda

Ours: first-stage posteriors cached, SDPA attention, the config's checkpointing and precision.
Original: every image re-encoded by the first stage at every step, einsum/softmax attention in fp32,
no checkpointing. Both freeze the same weights (requires_grad=False) and see the same batches.
Peak memory is measured in a child process per variant, above the RSS after warm-up (the high-water mark
is reset there, so filling the latent cache does not count).
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import implementation, build, load_config, median, peak_memory, timed  # noqa: E402
from ldm.data.personalized import PersonalizedBase, resolve_templates  # noqa: E402

DEFAULT_CONFIG = ["models/ldm/tiny-shapes/config.yaml", "configs/tiny-shapes/finetune.yaml"]
DEFAULT_CKPT = "models/ldm/tiny-shapes/model.safetensors"


def image_pool(size, n=5, seed=0):
    """n images and their flips, (2n, size, size, 3) in [-1, 1]: what a TI run draws its batches from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, size, size, 3, generator=g) * 2 - 1
    return torch.cat([x, x.flip(2)])


def caption_templates(config):
    """The templates the config's TI dataset captions its images with (the dataset's default without one)."""
    train = config.get("data", {}).get("params", {}).get("train", {}).get("params", {})
    templates = train.get("templates")
    return resolve_templates(templates) if templates is not None else PersonalizedBase.templates


def batches(pool, batch_size, count, templates=("a photo of a {}",), seed=0):
    """Batches as a TI run draws them: images from the pool, each captioned by a random template."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        idx = rng.choice(len(pool), batch_size, replace=batch_size > len(pool))  # repeats, as the dataset has
        captions = [templates[k].format("*") for k in rng.integers(len(templates), size=batch_size)]
        yield {"image": pool[idx], "caption": captions}


class Variant:
    def __init__(self, config, ckpt, ours, device, precision):
        self.ours, self.device = ours, device
        self.model = build(config.copy(), ckpt, ours, device)
        self.opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-3)
        self.autocast = precision if ours else "fp32"

    def fill_cache(self, pool, templates):
        """Encode every pool image and caption once, as the first pass over a TI dataset does: the steps measured
        afterwards are the steady state (a few random warm-up batches may miss some). Captions are memoised by
        the tokenizer, and with output injection their encoder states too."""
        with torch.no_grad():
            if self.model.latent_cache is not None:
                for image in pool:
                    self.model.latents_from_batch({"image": image[None].to(self.device)})
            self.model.get_learned_conditioning([t.format("*") for t in templates])

    def step(self, batch):
        batch = {"image": batch["image"].to(self.device), "caption": batch["caption"]}
        with implementation(self.ours), torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                                       enabled=self.autocast == "bf16"):
            loss, _ = self.model.shared_step(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def breakdown(variant, batch, repeats=10):
    """ms per part of our step: data (latents), text encoder, UNet forward, backward, optimizer."""
    m, parts = variant.model, {k: [] for k in ("latents", "text encoder", "unet forward", "backward", "optimizer")}
    for _ in range(repeats):
        with implementation(True):
            b = {"image": batch["image"].to(variant.device), "caption": batch["caption"]}
            holder = {}
            parts["latents"].append(timed(lambda: holder.update(z=m.latents_from_batch(b)), variant.device))
            t = m.draw_timesteps(len(b["caption"]), variant.device)
            parts["text encoder"].append(timed(
                lambda: holder.update(c=m.conditioning_by_band(b["caption"], m.timestep_band(t))), variant.device))
            parts["unet forward"].append(timed(lambda: holder.update(loss=m.p_losses(holder["z"], holder["c"], t)[0]),
                                               variant.device))
            parts["backward"].append(timed(lambda: holder["loss"].backward(), variant.device))
            parts["optimizer"].append(timed(lambda: (variant.opt.step(), variant.opt.zero_grad()), variant.device))
    return {k: median(v) for k, v in parts.items()}


def memory_child(args):
    """Runs in a child process: peak memory of `steps` steps of one variant."""
    config = load_config(args.config, args.overrides)
    v = Variant(config, args.ckpt, args.memory_of == "ours", args.device, args.precision)
    pool = image_pool(args.size or config.model.params.first_stage_config.params.ddconfig.resolution)
    templates = caption_templates(config)
    data = list(batches(pool, args.batch, args.warmup + 4, templates))
    v.fill_cache(pool, templates)
    for b in data[: args.warmup]:
        v.step(b)
    print(json.dumps({"peak_mib": peak_memory(args.device, lambda: [v.step(b) for b in data[args.warmup:]])}))


def measure_memory(args, which):
    cmd = [sys.executable, __file__, "--memory_of", which, "--device", args.device, "--batch", str(args.batch),
           "--precision", args.precision, "--warmup", str(args.warmup), "--config", *args.config]
    cmd += ["--ckpt", args.ckpt] if args.ckpt else ["--ckpt", ""]
    cmd += ["--size", str(args.size)] if args.size else []
    # glibc keeps freed small blocks in its heap, so the RSS after warm-up would already hold the step's
    # peak: in the child, blocks of 8 KiB and more are mapped and returned to the system when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "8192", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd + list(args.overrides), capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=DEFAULT_CONFIG)
    p.add_argument("--ckpt", default=None, help="weights (default: the shipped model for the default config)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=None, help="image size (default: the first stage's resolution)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="autocast for ours")
    p.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (both variants)")
    args = p.parse_args(argv)
    if args.ckpt is None:
        args.ckpt = DEFAULT_CKPT if args.config == DEFAULT_CONFIG else ""
    if args.memory_of:
        return memory_child(args)

    config = load_config(args.config, args.overrides)
    size = args.size or config.model.params.first_stage_config.params.ddconfig.resolution
    ours, orig = (Variant(config, args.ckpt, flag, args.device, args.precision) for flag in (True, False))
    pool, templates = image_pool(size), caption_templates(config)
    ours.fill_cache(pool, templates)
    orig.fill_cache(pool, templates)
    times = {"ours": [], "original": []}
    for i, b in enumerate(batches(pool, args.batch, args.warmup + args.steps, templates)):
        for name, v in (("ours", ours), ("original", orig)) if i % 2 else (("original", orig), ("ours", ours)):
            ms = timed(lambda: v.step(b), args.device)
            if i >= args.warmup:
                times[name].append(ms)
    mem = {name: measure_memory(args, name) for name in ("ours", "original")}
    t_ours, t_orig = median(times["ours"]), median(times["original"])
    print(f"TI step, {' + '.join(args.config)}, batch {args.batch}, {size}px, {args.device}, ours {args.precision}")
    print(f"{'':10}{'ms/step (median)':>18}{'peak MiB':>12}")
    print(f"{'original':10}{t_orig:>18.1f}{mem['original']:>12.1f}")
    print(f"{'ours':10}{t_ours:>18.1f}{mem['ours']:>12.1f}")
    print(f"speed-up {t_orig / t_ours:.2f}x, memory ratio {mem['ours'] / max(mem['original'], 1e-9):.2f}")
    parts = breakdown(ours, next(batches(pool, args.batch, 1, templates)))
    total = sum(parts.values())
    print("where our step's time goes: " + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts.items()))


if __name__ == "__main__":
    main()
