"""The GPU check's benchmarks: TI step and sampling, ours vs the original's way, on each config; one table.

    python bench/gpu_check.py --device cuda     # LDM-1.4B-shaped 256 px bf16, SD 1.x 512, SD 2.x 768-v, SDXL 1024
    python bench/gpu_check.py --smoke           # CPU, the shipped tiny model and the tiny SD 2.x fixture config

bench/gpu_check.sh runs it after bench/parity_cases.py. Variants as in bench/ti_step.py and bench/sample.py:
ours is the config's checkpointing, recomputed projections, layout, latent cache, SDPA and (where the row says
bf16) bf16 autocast; the original runs fp32 with einsum attention, re-encodes and re-reads every batch, and guides
with two UNet forwards. Big configs start from random weights (no real weights are needed for speed). Each
variant runs its warm-up steps, then its timed steps inside one peak-memory window: CUDA's allocator peak above
the memory held before them, or on a CPU the RSS high-water mark (rough: glibc keeps freed blocks for reuse,
so it often reads 0). A variant that runs out of GPU memory is reported as OOM.
"""
import argparse
import gc
import os
import sys
from dataclasses import dataclass

import torch

from bench.common import implementation, load_config, median, peak_memory, timed
from bench.ti_step import DEFAULT_CKPT, DEFAULT_CONFIG, DEFAULT_DATA, Variant, batch_indices, ti_dataset
from ldm.models.diffusion.sampling import ddim_schedule, guided_eps, sample_ddim

SDXL_CONFIG = "configs/stable-diffusion/sdxl-finetune.yaml"
COLUMNS = ("config", "bench", "it/s ours", "it/s original", "ratio", "peak MiB ours", "peak MiB original", "mem ratio")


@dataclass
class Case:
    name: str
    configs: list
    batch: int
    precision: str = "fp32"
    ckpt: str = ""
    ti_steps: int = 5
    sample_steps: int = 10
    warmup: int = 2


def gpu_cases():
    """The GPU rows: the LDM-1.4B-shaped config as the paper ran it, and the largest Stable Diffusion layouts."""
    cases = [Case("LDM-1.4B 256px bf16 b4", ["configs/latent-diffusion/txt2img-1p4B-finetune.yaml"], 4, "bf16"),
             Case("SD1.x 512px bf16 b2", ["configs/stable-diffusion/v1-finetune.yaml"], 2, "bf16"),
             Case("SD2.x 768-v bf16 b1", ["configs/stable-diffusion/v2-finetune.yaml"], 1, "bf16")]
    if os.path.exists(SDXL_CONFIG):
        cases.append(Case("SDXL 1024px bf16 b1", [SDXL_CONFIG], 1, "bf16", ti_steps=3, sample_steps=6))
    return cases


def smoke_cases():
    """CPU rows on tiny configs, a couple of steps each: the script's plumbing, not its figures."""
    return [Case("tiny-shapes 32px b4", DEFAULT_CONFIG, 4, ckpt=DEFAULT_CKPT, ti_steps=2, sample_steps=3, warmup=1),
            Case("tiny SD2.x-v 64px b2", ["tests/fixtures/sdx_tiny_v2/config.yaml"], 2, ti_steps=2, sample_steps=3,
                 warmup=1)]


def pixel_size(config):
    """Image side in pixels: the latent size times the first stage's downsampling."""
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    return config.model.params.image_size * 2 ** (len(ddconfig.ch_mult) - 1)


def free(device):
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def measured(device, fn, steps, warm_up):
    """(it/s, peak MiB) of `steps` calls of fn() in one peak-memory window after warm_up(); (None, None) when CUDA
    runs out of memory in either."""
    times = []
    try:
        warm_up()
        peak = peak_memory(device, lambda: [times.append(timed(fn, device)) for _ in range(steps)])
    except torch.cuda.OutOfMemoryError:
        free(device)
        return None, None
    return 1000.0 / median(times), peak


def ti_rows(case, device):
    """-> (TI step row, the ours Variant): steps/s and peak memory of each variant on the same batches."""
    config = load_config(case.configs)
    size = pixel_size(config)
    dataset = ti_dataset(config, DEFAULT_DATA, size)
    batches = batch_indices(dataset, case.batch, case.warmup + case.ti_steps)
    result = {}
    for name, ours in (("ours", True), ("original", False)):
        with torch.device(device):  # random init on the device: seconds instead of a minute per 1B parameters
            v = Variant(config.copy(), case.ckpt, ours, device, case.precision)
        v.fill_cache(dataset)
        pending = list(enumerate(batches))

        def step():
            seed, indices = pending.pop(0)
            v.step(dataset, indices, seed)

        result[name] = measured(device, step, case.ti_steps, lambda: [step() for _ in range(case.warmup)])
        if ours:
            kept = v
        else:
            del v
            free(device)
    return row(case.name, "TI step", result), kept


def sample_row(case, variant, device):
    """DDIM steps/s with guidance 3: ours (one batched forward, SDPA, the row's precision) vs two forwards in fp32."""
    model = variant.model.eval()
    n = case.batch
    with torch.no_grad(), implementation(True):  # fp32 contexts: autocast casts them for ours
        bands = model.banded_conditioning(["a photo of a *"] * n)
        uc = model.get_learned_conditioning([""] * n)
    x_T = torch.randn((n, model.channels, model.image_size, model.image_size),
                      generator=torch.Generator().manual_seed(0)).to(device)
    sched = ddim_schedule(model.alphas_cumprod, case.sample_steps)

    def separate(x, t):
        e_uc, e_c = model.apply_model(x, t, uc), model.apply_model(x, t, bands[0])
        return e_uc + 3.0 * (e_c - e_uc)

    result = {}
    for name, ours, eps_fn in (("ours", True, guided_eps(model, bands, uc, 3.0)), ("original", False, separate)):
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=ours and case.precision == "bf16")
        with torch.no_grad(), implementation(ours), autocast:
            its, peak = measured(device, lambda: sample_ddim(eps_fn, x_T, sched), 1,
                                 lambda: sample_ddim(eps_fn, x_T, ddim_schedule(model.alphas_cumprod, 1)))
        result[name] = (None if its is None else its * case.sample_steps, peak)
    return row(case.name, f"DDIM {case.sample_steps}", result)


def row(config, bench, result):
    """One table row from {"ours": (it/s, MiB), "original": (it/s, MiB)}; None (OOM) and 0 MiB give no ratio."""
    (its_o, mem_o), (its_r, mem_r) = result["ours"], result["original"]
    ratio = its_o / its_r if its_o and its_r else None
    mem_ratio = mem_o / mem_r if mem_o is not None and mem_r else None
    return (config, bench, its_o, its_r, ratio, mem_o, mem_r, mem_ratio)


def cell(value, fmt, column):
    if value is None:
        return "-" if "ratio" in column else "OOM"
    return value if isinstance(value, str) else format(value, fmt)


def format_table(rows):
    """Markdown table of the rows (COLUMNS): OOM where a variant ran out of memory, - where a ratio is undefined."""
    fmts = ("", "", ".2f", ".2f", ".2f", ".1f", ".1f", ".2f")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(v, f, c) for v, f, c in zip(r, fmts, COLUMNS)) + " |" for r in rows]
    return "\n".join(lines)


def run(cases, device):
    rows = []
    for case in cases:
        ti, ours = ti_rows(case, device)
        rows += [ti, sample_row(case, ours, device)]
        for line in format_table(rows[-2:]).splitlines()[-2:]:  # kept if a time limit stops the run
            print("done:", line, file=sys.stderr, flush=True)
        del ours
        free(device)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny configs, a couple of steps each")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else args.device
    print(format_table(run(smoke_cases() if args.smoke else gpu_cases(), device)))


if __name__ == "__main__":
    main()
