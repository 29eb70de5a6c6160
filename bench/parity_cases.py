"""Numeric parity with the reference code's recorded cases, on any device.

    python bench/parity_cases.py --device cuda

Runs the tiny fixture models (tests/fixtures/ldm_tiny: LDM, eps; tests/fixtures/sdx_tiny_v2: SD 2.x, v;
tests/fixtures/sdx_tiny_xl: SDXL) on the device and compares the UNet output, the first stage and a 5-step guided
chain (DDIM; SDXL: sgm's Euler) with the outputs the reference code recorded in fp32 on a CPU (the cases
tests/test_ldm_parity.py, tests/test_sd2.py and tests/test_sdxl.py check there).
The fixture's tolerances hold on the CPU; on a GPU, TF32 is turned off and they are 10x wider, since its kernels
add in another order. Prints one line per case and exits 1 when one is off.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import SAMPLERS, ddim_schedule, guided_eps
from ldm.util import instantiate_from_config

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TOL = 1e-5  # single passes (absolute and relative)
CHAIN_TOL = 1e-4  # the DDIM chain
SDXL_CHAIN_TOL = 2e-4  # sgm's Euler chain (values up to about 50)
GPU_WIDER = 10.0
# name: (folder, UNet output case, guidance scale of the recorded DDIM chain)
MODELS = {"ldm (eps)": ("ldm_tiny", "out.unet.eps", 3.0), "sd2 (v)": ("sdx_tiny_v2", "out.unet.v", 5.0)}


def load_fixture(folder, device):
    """-> (model in eval mode on device, cases {name: tensor} on device) of a fixture folder."""
    folder = FIXTURES / folder
    if (folder / "config.yaml").exists():
        config = OmegaConf.load(folder / "config.yaml").model
    else:
        config = OmegaConf.create(json.loads((folder / "hyperparameters.json").read_text())["constructor_arguments"])
    model = instantiate_from_config(config)
    model.load_state_dict(load_file(str(folder / "state_dict.safetensors")), strict=True)
    cases = {k: v.to(device) for k, v in load_file(str(folder / "cases.safetensors")).items()}
    return model.to(device).eval(), cases


def case_outputs(model, cases, unet_key, scale):
    """{case name: (ours, recorded, tolerance)} of one fixture model; tensors of any shape."""
    with torch.no_grad():
        eps = model.apply_model(cases["in.unet.x"], cases["in.unet.timesteps"], cases["in.unet.context"])
        post = model.encode_first_stage(cases["in.first_stage.image"])
        z_mode = model.get_first_stage_encoding(post.mode())
        samples, inter = DDIMSampler(model).sample(
            S=5, batch_size=2, shape=tuple(cases["in.ddim.x_T"].shape[1:]), conditioning=cases["in.ddim.c"],
            eta=0.0, x_T=cases["in.ddim.x_T"], unconditional_guidance_scale=scale,
            unconditional_conditioning=cases["in.ddim.uc"], log_every_t=1, verbose=False)
        decoded = model.decode_first_stage(samples)
    return {
        "unet": (eps, cases[unet_key], TOL),
        "first stage mean": (post.mean, cases["out.first_stage.posterior_mean"], TOL),
        "first stage z": (z_mode, cases["out.first_stage.z_scaled_mode"], TOL),
        "ddim samples": (samples, cases["out.ddim.samples"], CHAIN_TOL),
        "ddim pred_x0": (torch.stack(inter["pred_x0"]), cases["out.ddim.pred_x0"], CHAIN_TOL),
        "ddim decoded": (decoded, cases["out.ddim.decoded"], CHAIN_TOL),
    }


def sdxl_case_outputs(model, cases):
    """{case name: (ours, recorded, tolerance)} of the SDXL fixture: conditioner, UNet, a 5-step guided Euler chain."""
    sizes = {k: cases[f"in.{k}"] for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")}
    prompts = json.loads(json.loads((FIXTURES / "sdx_tiny_xl" / "cases_index.json").read_text())["metadata"]["prompts"])
    with torch.no_grad():
        cond = model.cond_stage_model({"txt": prompts, **sizes})
        eps = model.model.diffusion_model(cases["in.unet.x"], cases["in.unet.timesteps"],
                                          context=cases["in.unet.context"], y=cases["in.unet.y"])
        c = {"crossattn": cases["out.cond.crossattn"], "vector": cases["out.cond.vector"]}
        uc = {"crossattn": cases["out.uc.crossattn"], "vector": cases["out.uc.vector"]}
        sched = ddim_schedule(model.alphas_cumprod, 5, 0.0, "legacy")
        samples = SAMPLERS["euler"](guided_eps(model, c, uc, 5.0), cases["in.sample.randn"], sched)
        decoded = model.decode_first_stage(samples)
    return {
        "conditioning": (cond["crossattn"], cases["out.cond.crossattn"], TOL),
        "vector": (cond["vector"], cases["out.cond.vector"], TOL),
        "unet": (eps, cases["out.unet.eps"], TOL),
        "euler samples": (samples, cases["out.sample_euler.samples"], SDXL_CHAIN_TOL),
        "euler decoded": (decoded, cases["out.sample_euler.decoded"], SDXL_CHAIN_TOL),
    }


def compare(ours, recorded, tol):
    """-> (max |ours - recorded|, within tol: |d| <= tol + tol * |recorded| everywhere)."""
    diff = (ours.float() - recorded.float()).abs()
    return diff.max().item(), bool((diff <= tol + tol * recorded.float().abs()).all())


def run_cases(device):
    """-> list of (model, case, max abs diff, tolerance, ok) on device."""
    gpu = str(device).startswith("cuda")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name, (folder, unet_key, scale) in MODELS.items():
        model, cases = load_fixture(folder, device)
        for case, (ours, recorded, tol) in case_outputs(model, cases, unet_key, scale).items():
            tol = tol * (GPU_WIDER if gpu else 1.0)
            diff, ok = compare(ours, recorded, tol)
            rows.append((name, case, diff, tol, ok))
    model, cases = load_fixture("sdx_tiny_xl", device)
    for case, (ours, recorded, tol) in sdxl_case_outputs(model, cases).items():
        tol = tol * (GPU_WIDER if gpu else 1.0)
        diff, ok = compare(ours, recorded, tol)
        rows.append(("sdxl (eps)", case, diff, tol, ok))
    return rows


def format_rows(rows, device):
    lines = [f"parity with the reference cases on {device}", f"{'model':<12}{'case':<18}{'max |diff|':>12}"
             f"{'tolerance':>11}  result"]
    lines += [f"{m:<12}{c:<18}{d:>12.2e}{t:>11.0e}  {'ok' if ok else 'OFF'}" for m, c, d, t, ok in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run_cases(args.device)
    print(format_rows(rows, args.device))
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
