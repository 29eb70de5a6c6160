"""One textual-inversion training step, ours vs the original code's way, interleaved in one process.

    python bench/ti_step.py                                   # the shipped tiny model
    python bench/ti_step.py --config configs/bench/mid.yaml   # mid-size, random init
    python bench/ti_step.py --config configs/latent-diffusion/txt2img-1p4B-finetune.yaml --device cuda

Ours: first-stage posteriors cached, SDPA attention, the config's checkpointing, recomputed projections, layout
and precision, images decoded once, caption ids memoised. Original: every image read from its file and re-encoded
by the first stage at every step, every caption tokenized, einsum/softmax attention in fp32, no checkpointing or
recomputation, PyTorch's default layout. Both freeze the same weights
(requires_grad=False) and see the same batches of the config's TI dataset on --data_root.
Peak memory is measured in a child process per variant, above the RSS after warm-up (the high-water mark
is reset there, so filling the latent cache does not count).
"""
import argparse
import collections
import contextlib
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from bench.common import build, implementation, load_config, median, peak_memory, timed
from ldm.util import instantiate_from_config

DEFAULT_CONFIG = ["models/ldm/tiny-shapes/config.yaml", "configs/tiny-shapes/finetune.yaml"]
DEFAULT_CKPT = "models/ldm/tiny-shapes/model.safetensors"
DEFAULT_DATA = "dataset/checker_circle"


def image_size(config):
    return config.model.params.first_stage_config.params.ddconfig.resolution


def ti_dataset(config, data_root, size):
    """The config's TI dataset (its target and parameters; PersonalizedBase without one) on data_root at `size`."""
    train = config.get("data", {}).get("params", {}).get("train")
    spec = {"target": "ldm.data.personalized.PersonalizedBase"} if train is None else OmegaConf.to_container(train)
    params = {**spec.get("params", {}), "data_root": data_root, "size": size, "set": "train"}
    return instantiate_from_config({"target": spec["target"], "params": params})


def batch_indices(dataset, batch_size, count, seed=0):
    """Item indices of `count` batches, drawn uniformly (a TI run shuffles 100 repeats of each image)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(len(dataset), size=batch_size) for _ in range(count)]


def fetch(dataset, indices, seed):
    """The collated batch of dataset[indices], its random flips and captions drawn from `seed` (the same batch for
    both variants; each reads its images its own way)."""
    random.seed(seed)
    return default_collate([dataset[int(i)] for i in indices])


class Variant:
    def __init__(self, config, ckpt, ours, device, precision):
        self.ours, self.device = ours, device
        self.model = build(config.copy(), ckpt, ours, device)
        self.opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-3)
        self.autocast = precision if ours else "fp32"

    def fill_cache(self, dataset):
        """Encode every image (and its flip) and caption once, as the first pass over a TI dataset does: the steps
        measured afterwards are the steady state. Captions are memoised by the tokenizer, and with output
        injection their encoder states too."""
        flip_p = dataset.flip_p
        with torch.no_grad(), self.context():
            for dataset.flip_p in (0.0, 1.0):
                for i in range(dataset.num_images):
                    batch = to_device(fetch(dataset, [i], 0), self.device)
                    if self.model.latent_cache is not None:
                        self.model.latents_from_batch(batch)
            dataset.flip_p = flip_p
            random.seed(0)
            self.model.get_learned_conditioning(sorted({dataset[i]["caption"] for i in range(len(dataset))}))

    @contextlib.contextmanager
    def context(self):
        """The variant's implementation switches and autocast (ours: bf16 where asked; the original: fp32)."""
        with implementation(self.ours), torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                                       enabled=self.autocast == "bf16"):
            yield

    def step(self, dataset, indices, seed):
        with self.context():
            loss, _ = self.model.shared_step(to_device(fetch(dataset, indices, seed), self.device))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def breakdown(variant, dataset, indices, repeats=10):
    """ms per part of our step: data, latents, text encoder, UNet forward, backward, optimizer."""
    m = variant.model
    parts = {k: [] for k in ("data", "latents", "text encoder", "unet forward", "backward", "optimizer")}
    for i in range(repeats):
        with variant.context():
            holder = {}
            parts["data"].append(timed(lambda: holder.update(b=to_device(fetch(dataset, indices, i), variant.device)),
                                       variant.device))
            b = holder["b"]
            parts["latents"].append(timed(lambda: holder.update(z=m.latents_from_batch(b)), variant.device))
            t = m.draw_timesteps(len(b["caption"]), variant.device)
            parts["text encoder"].append(timed(
                lambda: holder.update(c=m.conditioning_by_band(b["caption"], m.timestep_band(t))), variant.device))
            parts["unet forward"].append(timed(lambda: holder.update(loss=m.p_losses(holder["z"], holder["c"], t)[0]),
                                               variant.device))
            parts["backward"].append(timed(lambda: holder["loss"].backward(), variant.device))
            parts["optimizer"].append(timed(lambda: (variant.opt.step(), variant.opt.zero_grad()), variant.device))
    return {k: median(v) for k, v in parts.items()}


def outside_operators(variant, dataset, indices, repeats=5):
    """Bounds on the share of our step's time outside PyTorch's operators and autograd nodes (Python: modules, data,
    loss), from the profiler's outermost events on the stepping thread. Upper: the profiled step's time outside
    them; lower: the same less all the time the profiler adds to the step."""
    def run():
        start = time.perf_counter()
        for i in range(repeats):
            variant.step(dataset, indices, i)
        return (time.perf_counter() - start) * 1e6

    plain_us = run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled_us = run()
    inside = collections.Counter()
    for e in prof.events():
        if e.cpu_parent is None:
            inside[e.thread] += e.time_range.elapsed_us()
    outside_us = profiled_us - max(inside.values(), default=0.0)
    return max(0.0, outside_us - max(0.0, profiled_us - plain_us)) / plain_us, max(0.0, outside_us / profiled_us)


def memory_child(args):
    """Runs in a child process: peak memory of `steps` steps of one variant."""
    config = load_config(args.config, args.overrides)
    v = Variant(config, args.ckpt, args.memory_of == "ours", args.device, args.precision)
    dataset = ti_dataset(config, args.data_root, args.size or image_size(config))
    steps = list(enumerate(batch_indices(dataset, args.batch, args.warmup + 4)))
    v.fill_cache(dataset)
    for seed, indices in steps[: args.warmup]:
        v.step(dataset, indices, seed)
    print(json.dumps({"peak_mib": peak_memory(args.device, lambda: [v.step(dataset, indices, seed)
                                                                    for seed, indices in steps[args.warmup:]])}))


def measure_memory(args, which):
    cmd = [sys.executable, __file__, "--memory_of", which, "--device", args.device, "--batch", str(args.batch),
           "--precision", args.precision, "--warmup", str(args.warmup), "--data_root", args.data_root,
           "--config", *args.config]
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
    p.add_argument("--data_root", default=DEFAULT_DATA, help="the training images (resized to --size)")
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
    size = args.size or image_size(config)
    ours, orig = (Variant(config, args.ckpt, flag, args.device, args.precision) for flag in (True, False))
    dataset = ti_dataset(config, args.data_root, size)
    ours.fill_cache(dataset)
    orig.fill_cache(dataset)
    times = {"ours": [], "original": []}
    for i, indices in enumerate(batch_indices(dataset, args.batch, args.warmup + args.steps)):
        for name, v in (("ours", ours), ("original", orig)) if i % 2 else (("original", orig), ("ours", ours)):
            ms = timed(lambda: v.step(dataset, indices, i), args.device)
            if i >= args.warmup:
                times[name].append(ms)
    mem = {name: measure_memory(args, name) for name in ("ours", "original")}
    t_ours, t_orig = median(times["ours"]), median(times["original"])
    print(f"TI step, {' + '.join(args.config)}, batch {args.batch}, {size}px, {args.device}, ours {args.precision}")
    print(f"{'':10}{'ms/step (median)':>18}{'peak MiB':>12}")
    print(f"{'original':10}{t_orig:>18.1f}{mem['original']:>12.1f}")
    print(f"{'ours':10}{t_ours:>18.1f}{mem['ours']:>12.1f}")
    print(f"speed-up {t_orig / t_ours:.2f}x, memory ratio {mem['ours'] / max(mem['original'], 1e-9):.2f}")
    indices = batch_indices(dataset, args.batch, 1)[0]
    parts = breakdown(ours, dataset, indices)
    total = sum(parts.values())
    print("where our step's time goes: "
          + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts.items()))
    low, high = outside_operators(ours, dataset, indices)
    print(f"outside PyTorch's operators (Python; profiler): {100 * low:.0f}-{100 * high:.0f}% of our step")


if __name__ == "__main__":
    main()
