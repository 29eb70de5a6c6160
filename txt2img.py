"""Sample images from a text prompt, optionally with a learned textual-inversion embedding.

    python txt2img.py --embedding_path logs/RUN/checkpoints/embeddings.pt \
        --ckpt_path models/ldm/text2img-large/model.ckpt --prompt "a photo of *" \
        --ddim_steps 50 --outdir outputs/NAME --scale 7.5 --n_samples 4 --n_iter 1 --ddim_eta 0.0

An autoregressive config (ldm.models.autoregressive.ar.ARTextToImage, e.g. models/ar/tiny-shapes/config.yaml)
samples codes instead: --top_k, --top_p and --temperature apply, the diffusion sampler options do not.
"""
import argparse
import logging
import os
import re
import sys

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ldm.models.diffusion.sampling import SAMPLERS, SPACINGS, sample_latents
from load import load_model_from_config, read_state_dict
from make_log_new import make_grid, save_png

log = logging.getLogger("txt2img")

DEFAULT_MANAGER = {"target": "ldm.modules.embedding_manager.EmbeddingManager",
                   "params": {"placeholder_strings": ["*"], "initializer_words": None}}


def get_parser(default_config="configs/latent-diffusion/txt2img-1p4B-eval.yaml",
               default_ckpt="models/ldm/text2img-large/model.ckpt"):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", dest="from_file", default=None, help="one prompt per line")
    p.add_argument("--outdir", default="outputs/txt2img-samples")
    p.add_argument("--ddim_steps", type=int, default=200)
    p.add_argument("--plms", action="store_true", help="PLMS sampling instead of DDIM (same as --sampler plms)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS),
                   help="dpmpp_2m: DPM-Solver++(2M), good in about 20 steps")
    p.add_argument("--spacing", default=None, choices=list(SPACINGS),
                   help="timestep grid (default: uniform for ddim and plms, as the reference; logsnr for dpmpp_2m)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="0 is deterministic DDIM")
    p.add_argument("--n_iter", type=int, default=1, help="batches per prompt")
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--W", type=int, default=256)
    p.add_argument("--n_samples", type=int, default=4, help="images per batch")
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--top_k", type=int, default=0, help="autoregressive models: keep the k likeliest codes (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="autoregressive models: nucleus mass kept")
    p.add_argument("--temperature", type=float, default=1.0, help="autoregressive models: logit temperature")
    p.add_argument("--config", nargs="+", default=[default_config] if isinstance(default_config, str) else
                   list(default_config), help="model config(s), merged left to right")
    p.add_argument("--ckpt_path", default=default_ckpt)
    p.add_argument("--embedding_path", default=None, help="learned embedding file (embeddings.pt)")
    p.add_argument("--modules_path", default=None,
                   help="trained conditioner modules (default: modules.safetensors beside --embedding_path, if any)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def load_model(opt):
    for path, what in [*((c, "--config") for c in opt.config), (opt.ckpt_path, "--ckpt_path")]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path} not found")
    config = OmegaConf.merge(*[OmegaConf.load(c) for c in opt.config])
    params = config.model.params
    if opt.embedding_path and params.get("personalization_config") is None:
        params.personalization_config = DEFAULT_MANAGER
    model = load_model_from_config(config, opt.ckpt_path)
    if opt.embedding_path:
        if not os.path.isfile(opt.embedding_path):
            raise FileNotFoundError(f"--embedding_path {opt.embedding_path} not found")
        model.embedding_manager.load(opt.embedding_path)
    modules = opt.modules_path or modules_beside(opt.embedding_path)
    if modules:
        load_modules(model, modules)
    return model.to(opt.device)


def modules_beside(embedding_path):
    """checkpoints/modules<suffix>.safetensors for checkpoints/embeddings<suffix>.pt, if it exists."""
    if not embedding_path:
        return None
    folder, name = os.path.split(embedding_path)
    stem = os.path.splitext(name)[0]
    if not stem.startswith("embeddings"):
        return None
    path = os.path.join(folder, "modules" + stem[len("embeddings"):] + ".safetensors")
    return path if os.path.isfile(path) else None


def load_modules(model, path):
    """Load a run's trained conditioner modules (full state-dict keys) into `model`, checking they fit."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--modules_path {path} not found")
    state, _ = read_state_dict(path)
    own = model.state_dict()
    misfit = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if misfit:
        raise ValueError(f"{path} holds modules of another model ({misfit[0]} does not fit): "
                         "pass the --config the run was trained with")
    model.load_state_dict(state, strict=False)
    log.info("%s: %d conditioner tensors loaded", os.path.basename(path), len(state))


def read_prompts(opt):
    if opt.from_file:
        with open(opt.from_file) as f:
            return [line.strip() for line in f if line.strip()]
    return [opt.prompt]


def warn_missing_placeholder(model, prompt):
    manager = model.embedding_manager
    if manager is None:
        return
    strings = list(manager.string_to_token_dict)
    if not any(s in prompt for s in strings):
        log.warning("prompt %r does not contain the learned placeholder %s: the embedding is not used",
                    prompt, " or ".join(strings))


def latent_shape(model, opt):
    f = 2 ** (len(model.first_stage_model.encoder.down) - 1)
    return (opt.n_samples, model.channels, opt.H // f, opt.W // f)


def steps_per_batch(model, opt):
    """Sampler steps (diffusion) or codes (autoregressive) per batch, for the progress bar."""
    return model.sampling_steps if hasattr(model, "sample_images") else opt.ddim_steps


def sample_batch(model, prompts, opt, generator, callback=None):
    """prompts: list of B str -> images (B, 3, H, W) in [-1, 1] with the options of `opt`."""
    if hasattr(model, "sample_images"):  # autoregressive: the image size is the model's
        return model.sample_images(prompts, scale=opt.scale, temperature=opt.temperature, top_k=opt.top_k,
                                   top_p=opt.top_p, generator=generator, callback=callback)
    shape = latent_shape(model, opt)
    z = sample_latents(model, prompts, (len(prompts),) + shape[1:], steps=opt.ddim_steps, scale=opt.scale,
                       eta=opt.ddim_eta, sampler="plms" if opt.plms else opt.sampler, generator=generator,
                       callback=callback, spacing=opt.spacing)
    return model.decode_first_stage(z)


def to_uint8(x):
    """x: (B, 3, H, W) in [-1, 1] -> list of uint8 (H, W, 3)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(x)


def slug(prompt):
    return re.sub(r"[^\w\-<>*]+", "-", prompt.strip()).strip("-").replace("*", "star")[:120] or "prompt"


def run(opt):
    torch.manual_seed(opt.seed)
    model = load_model(opt)
    sample_dir = os.path.join(opt.outdir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    count = len(os.listdir(sample_dir))
    generator = torch.Generator(opt.device).manual_seed(opt.seed)
    written = []
    for prompt in read_prompts(opt):
        warn_missing_placeholder(model, prompt)
        images = []
        bar = tqdm(total=opt.n_iter * steps_per_batch(model, opt), desc=prompt[:40], unit="step")
        for _ in range(opt.n_iter):
            x = sample_batch(model, [prompt] * opt.n_samples, opt, generator, callback=lambda *a: bar.update(1))
            images.append(x)
            for img in to_uint8(x):
                path = os.path.join(sample_dir, f"{count:05}.png")
                save_png(img, path)
                written.append(path)
                count += 1
        bar.close()
        grid = make_grid((torch.cat(images).clamp(-1, 1) + 1) / 2, nrow=opt.n_samples)
        grid_path = os.path.join(opt.outdir, f"{slug(prompt)}-{count:05}.png")
        save_png(grid, grid_path)
        log.info("wrote %d samples to %s and the grid %s", opt.n_iter * opt.n_samples, sample_dir, grid_path)
    return written


def main(argv=None, overlays=(), **defaults):
    """overlays: configs merged after --config (the improvement entry points add their conditioner's)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = get_parser(**defaults).parse_args(argv)
    opt.config = list(opt.config) + [o for o in overlays if o not in opt.config]
    try:
        with torch.no_grad():
            return run(opt)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
