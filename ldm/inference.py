"""Sampling from a text-conditioned model, with or without a learned embedding: load a model from its configs and
weights (and an embedding, and trained conditioner modules), check the sampling options against it, sample a
prompt's batches and write them without ever replacing a file.

    run(SampleOptions(config=[...], ckpt_path=..., embedding_path=..., prompt="a photo of *", outdir=...))

`main` is the command line (txt2img.py, the `ti-sample` command); `SampleOptions` holds its flags' defaults.
"""
import dataclasses
import functools
import logging
import os
import re

import torch
from PIL import Image
from tqdm import tqdm

from ldm.checkpoints import check_model_path, load_model_from_config, read_state_dict
from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.inference_model import resolve_model
from ldm.models.diffusion import prompt_edits
from ldm.models.diffusion.sampling import SAMPLERS, SPACINGS, sample_latents
from ldm.modules.diffusionmodules.openaimodel import Downsample
from ldm.util import require_finite, require_positive, write_numbered

log = logging.getLogger(__name__)

USAGE = """Sample images from a text prompt, optionally with a learned textual-inversion embedding.

    python txt2img.py --embedding_path logs/RUN/checkpoints/embeddings.pt --prompt "a photo of *"
    python txt2img.py --config configs/stable-diffusion/v1-inference.yaml --ckpt_path MODEL \
        --embedding_path EMBEDDING --prompt "a photo of *" --outdir outputs/NAME --n_samples 4

An embedding inside a training run (logs/RUN/checkpoints/) samples with the model the run trained on (its saved
config and --actual_resume) unless --config/--ckpt_path say otherwise. --ckpt_path takes a .ckpt, a single-file
.safetensors (fp32 or fp16; its model.* UNet weights, --use_ema for its EMA copies) or a diffusers SD 1.x folder.
--H, --W, --ddim_steps and --scale default to the config's `sampling:` block (SD 1.x 512, SD 2.x-v 768), else
256, 256, 200 and 5.0. --embedding_path takes any embedding file or a diffusers concept folder.

A prompt may change words part-way through sampling, as in the AUTOMATIC1111 web UI: [to:when], [from::when],
[from:to:when], `when` a fraction of the way (or a step number). "a photo of a [yellow :0.4]*" adds `yellow` from
t = 600 down, once the concept's layout is drawn (docs/usage.md#editing-a-concept).

An autoregressive config (ldm.models.autoregressive.ar.ARTextToImage, e.g. models/ar/tiny-shapes/config.yaml)
samples codes instead: --top_k, --top_p and --temperature apply, the diffusion sampler options do not.

Samples go to <outdir>/samples/NNNNN.png and each prompt's grid to <outdir>/<prompt>-NNNNN.png, numbered on from
the largest number there: a file already in --outdir is never written over, and several runs may share one.
"""

DEFAULT_MANAGER = {"target": "ldm.modules.embedding_manager.EmbeddingManager",
                   "params": {"placeholder_strings": ["*"], "initializer_words": None}}


@dataclasses.dataclass
class SampleOptions:
    """txt2img.py's flags and their defaults (see its --help)."""

    prompt: str = "a painting of a virus monster playing guitar"
    from_file: str = None
    outdir: str = "outputs/txt2img-samples"
    ddim_steps: int = None  # None: the model config's `sampling` block (ldm.inference_model)
    plms: bool = False
    sampler: str = "ddim"
    spacing: str = None
    ddim_eta: float = 0.0
    n_iter: int = 1
    H: int = None
    W: int = None
    n_samples: int = 4
    scale: float = None
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    config: list = None  # None: the config of the run --embedding_path comes from
    ckpt_path: str = None  # None: that run's --actual_resume
    use_ema: bool = False
    embedding_path: str = None
    modules_path: str = None
    seed: int = 42
    device: str = dataclasses.field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    debug: bool = False


def check_options(opt):
    """Refuse, before any model is loaded, flag values that would fail inside the sampler or make wrong images."""
    require_finite(scale=opt.scale, ddim_eta=opt.ddim_eta, top_p=opt.top_p, temperature=opt.temperature)
    require_positive(n_samples=opt.n_samples, n_iter=opt.n_iter, ddim_steps=opt.ddim_steps, H=opt.H, W=opt.W,
                     temperature=opt.temperature)
    if opt.top_k < 0:
        raise UsageError(f"--top_k {opt.top_k} is negative: give how many likeliest codes to keep, or 0 for all")
    if not 0 < opt.top_p <= 1:
        raise UsageError(f"--top_p {opt.top_p} is outside (0, 1]: give the probability mass to keep (1 keeps all)")
    check_device(opt.device)


def check_device(name):
    """Refuse a --device torch does not know, or CUDA where there is none."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name} is not a device: use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")


def check_size(model, opt):
    """Refuse --H or --W that the model cannot sample at (autoregressive models sample at their own size)."""
    if hasattr(model, "sample_images"):
        return
    factor = size_factor(model)
    for flag in ("H", "W"):
        size = getattr(opt, flag)
        if size % factor:
            below = size // factor * factor
            nearest = f"{below} or {below + factor}" if below else str(factor)
            raise UsageError(f"--{flag} {size} is not a multiple of {factor}, this model's downsampling factor: "
                             f"use {nearest}")


def first_stage_factor(model):
    """Pixels per latent along a side: the first stage halves the image at each level but its last."""
    return 2 ** (len(model.first_stage_model.encoder.down) - 1)


def size_factor(model):
    """What image sizes must be multiples of: the first stage's factor times 2 for each time the UNet halves the
    latents (an odd size there would not come back to the size of its skip connection)."""
    halvings = sum(isinstance(m, Downsample) for m in model.model.diffusion_model.modules())
    return first_stage_factor(model) * 2 ** halvings


def check_inputs(opt):
    """Refuse a missing embedding, and weights that are missing or no checkpoint (an empty or foreign file, a folder
    that is no diffusers pipeline), before the model is built."""
    check_model_path(opt.ckpt_path, "--ckpt_path")
    if opt.embedding_path and not os.path.exists(opt.embedding_path):
        raise FileNotFoundError(f"--embedding_path {opt.embedding_path} not found: give an embedding file or a "
                                "diffusers concept folder")


def load_model(opt, config=None):
    """The model of `opt` (its configs, weights, embedding and trained modules) on opt.device; config: the merged
    config resolve_model returned (read again if None)."""
    config = config if config is not None else resolve_model(opt)
    check_inputs(opt)
    params = config.model.params
    if opt.embedding_path and params.get("personalization_config") is None:
        params.personalization_config = DEFAULT_MANAGER
    model = load_model_from_config(config, opt.ckpt_path, use_ema=opt.use_ema)
    if opt.embedding_path:
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
    """--prompt, or the lines of --from-file (UTF-8, blank lines skipped; a file without a prompt is refused)."""
    if not opt.from_file:
        return [opt.prompt]
    if not os.path.isfile(opt.from_file):
        raise FileNotFoundError(f"--from-file {opt.from_file} not found: give a text file with one prompt per line")
    try:
        with open(opt.from_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise UsageError(f"--from-file {opt.from_file} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    if not prompts:
        raise UsageError(f"--from-file {opt.from_file} holds no prompt: write one prompt per line")
    return prompts


def warn_missing_placeholder(model, prompt):
    manager = model.embedding_manager
    if manager is None:
        return
    strings = list(manager.string_to_token_dict)
    if not any(s in prompt for s in strings):
        log.warning("prompt %r does not contain the learned placeholder %s: the embedding is not used",
                    prompt, " or ".join(strings))


def check_prompt_edits(model, prompt):
    """A [from:to:when] group given to a model without timesteps fails before sampling."""
    if hasattr(model, "sample_images") and prompt_edits.has_edits(prompt):
        raise UsageError(f"prompt {prompt!r} holds a [from:to:when] edit, which needs a diffusion model's "
                         "timesteps: an autoregressive model takes plain prompts")


def latent_shape(model, opt):
    f = first_stage_factor(model)
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
    """A prompt as a file name that every OS accepts: word characters and '-' only ('*' -> 'star'), at most 120
    bytes of UTF-8."""
    name = re.sub(r"[^\w\-*]+", "-", prompt.strip()).strip("-").replace("*", "star")
    return name.encode()[:120].decode(errors="ignore").strip("-") or "prompt"


def write_png(folder, image, prefix=""):
    """uint8 (H, W, 3) -> a new file folder/<prefix>NNNNN.png (never one that exists) -> its path."""
    return write_numbered(folder, lambda path: Image.fromarray(image).save(path, format="PNG"), prefix=prefix,
                          suffix=".png")


def write_grid(images, opt, prompt):
    """The prompt's samples, (N, 3, H, W) in [-1, 1], n_samples a row -> a new <outdir>/<prompt>-NNNNN.png."""
    from ldm.callbacks.images import make_grid  # it loads pytorch_lightning (seconds): not before the flags are checked

    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=opt.n_samples)
    return write_png(opt.outdir, grid, prefix=f"{slug(prompt)}-")


def sample_prompt(model, prompt, opt, generator, sample_dir):
    """n_iter batches of `prompt`: each sample and the prompt's grid written under new names -> the sample paths."""
    warn_missing_placeholder(model, prompt)
    images, written = [], []
    bar = tqdm(total=opt.n_iter * steps_per_batch(model, opt), desc=prompt[:40], unit="step")
    for _ in range(opt.n_iter):
        x = sample_batch(model, [prompt] * opt.n_samples, opt, generator, callback=lambda *a: bar.update(1))
        images.append(x)
        written += [write_png(sample_dir, img) for img in to_uint8(x)]
    bar.close()
    grid_path = write_grid(torch.cat(images), opt, prompt)
    log.info("wrote %d samples to %s and the grid %s", len(written), sample_dir, grid_path)
    return written


@torch.no_grad()
def run(opt):
    """Sample every prompt of `opt` -> the paths of the samples written. overlays: configs merged after the
    model's (opt.overlays, set by `main`)."""
    config = resolve_model(opt, getattr(opt, "overlays", ()))
    check_options(opt)
    prompts = read_prompts(opt)
    for prompt in prompts:  # the syntax before the model loads; timesteps only scale the switch
        prompt_edits.parse(prompt, 1000, opt.ddim_steps)
    sample_dir = os.path.join(opt.outdir, "samples")
    os.makedirs(sample_dir, exist_ok=True)  # an --outdir that cannot be written fails before the model loads
    torch.manual_seed(opt.seed)
    model = load_model(opt, config)
    check_size(model, opt)
    for prompt in prompts:
        check_prompt_edits(model, prompt)
    generator = torch.Generator(opt.device).manual_seed(opt.seed)
    return [path for prompt in prompts for path in sample_prompt(model, prompt, opt, generator, sample_dir)]


def get_parser(default_config=None, default_ckpt=None):
    d = SampleOptions()
    default_config = default_config or d.config
    p = ArgumentParser(prog="txt2img.py", description=USAGE)
    p.add_argument("--prompt", default=d.prompt)
    p.add_argument("--from-file", dest="from_file", default=None, help="one prompt per line")
    p.add_argument("--outdir", default=d.outdir)
    p.add_argument("--ddim_steps", type=int, default=None, help="default: the config's sampling block, else 200")
    p.add_argument("--plms", action="store_true", help="PLMS sampling instead of DDIM (same as --sampler plms)")
    p.add_argument("--sampler", default=d.sampler, choices=sorted(SAMPLERS),
                   help="dpmpp_2m: DPM-Solver++(2M), good in about 20 steps")
    p.add_argument("--spacing", default=None, choices=list(SPACINGS),
                   help="timestep grid (default: uniform for ddim and plms, as the reference; logsnr for dpmpp_2m)")
    p.add_argument("--ddim_eta", type=float, default=d.ddim_eta, help="0 is deterministic DDIM")
    p.add_argument("--n_iter", type=int, default=d.n_iter, help="batches per prompt")
    p.add_argument("--H", type=int, default=None, help="image height (default: the config's sampling block, else 256)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the config's sampling block, else 256)")
    p.add_argument("--n_samples", type=int, default=d.n_samples, help="images per batch")
    p.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the config's sampling block, else 5.0)")
    p.add_argument("--top_k", type=int, default=d.top_k,
                   help="autoregressive models: keep the k likeliest codes (0: all)")
    p.add_argument("--top_p", type=float, default=d.top_p, help="autoregressive models: nucleus mass kept")
    p.add_argument("--temperature", type=float, default=d.temperature, help="autoregressive models: logit temperature")
    p.add_argument("--config", nargs="+", default=[default_config] if isinstance(default_config, str) else
                   default_config, help="model config(s), merged left to right (default: the embedding's run's)")
    p.add_argument("--ckpt_path", default=default_ckpt,
                   help="model weights: .ckpt, .safetensors or a diffusers folder (default: the embedding's run's "
                        "--actual_resume)")
    p.add_argument("--use_ema", action="store_true",
                   help="sample with the checkpoint's EMA UNet weights (model_ema.*) instead of model.*")
    p.add_argument("--embedding_path", default=None,
                   help="learned embedding (embeddings.pt, any supported format, or a diffusers concept folder)")
    p.add_argument("--modules_path", default=None,
                   help="trained conditioner modules (default: modules.safetensors beside --embedding_path, if any)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv=None, overlays=(), **defaults):
    """overlays: configs merged after --config (the improvement entry points add their conditioner's)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = get_parser(**defaults).parse_args(argv)
    opt.overlays = tuple(overlays)
    return run_command(functools.partial(run, opt), opt.debug)
