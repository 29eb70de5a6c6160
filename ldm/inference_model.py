"""Which model txt2img samples, and with which defaults: the configs and weights its flags name, else those of the
training run an `--embedding_path` comes from; image size, steps and guidance from the config's `sampling` block.

    config = resolve_model(opt)  # fills opt.config, opt.ckpt_path and the sampling flags left unset

A run folder (logs/RUN, as ldm.callbacks.run_folder writes it) keeps the merged config it trained with under
configs/<time>-project.yaml, and in it `run.actual_resume`, the weights it started from: an embedding at
logs/RUN/checkpoints/<file> samples with that model unless --config or --ckpt_path says otherwise.
"""
import glob
import os

from omegaconf import OmegaConf

from ldm.checkpoints import read_config
from ldm.cli import UsageError
from ldm.config_check import TRUSTED_MODULES, check_sampling, untrusted_targets

# what a config without a `sampling` block samples with: the original txt2img.py's defaults (LDM text2img-large)
FALLBACK_SAMPLING = {"H": 256, "W": 256, "ddim_steps": 200, "scale": 5.0}
NO_MODEL = ("no model to sample: give --config CONFIG.yaml and --ckpt_path MODEL (.ckpt, .safetensors or a diffusers "
            "folder), or an --embedding_path inside a training run (logs/RUN/checkpoints/embeddings.pt), whose saved "
            "config names its model")


def saved_run_config(embedding_path):
    """The newest configs/*-project.yaml of the run folder holding `embedding_path` (RUN/checkpoints/FILE), or
    None where it is not in one."""
    if not embedding_path:
        return None
    folder = os.path.dirname(os.path.abspath(embedding_path))
    if os.path.basename(folder) != "checkpoints":
        return None
    saved = sorted(glob.glob(os.path.join(os.path.dirname(folder), "configs", "*-project.yaml")))
    return saved[-1] if saved else None


def run_config(path):
    """What sampling needs of a run folder's saved config (model, sampling, run), refused in one line where its
    model names code outside this framework (the data section, never built here, may name the original's)."""
    saved = read_config(path)
    config = OmegaConf.masked_copy(saved, [k for k in ("model", "sampling", "run") if k in saved])
    outside = untrusted_targets(config, TRUSTED_MODULES)
    if outside:
        raise UsageError(f"{path} names code outside this framework ({', '.join(outside)}); configs are code: give "
                         "--config and --ckpt_path yourself if you trust it")
    return config


def resolve_model(opt, overlays=()):
    """Fill opt.config and opt.ckpt_path where unset (from the embedding's run folder), and the sampling flags left
    None (from the config's `sampling` block, else FALLBACK_SAMPLING) -> the merged model config.
    overlays: configs merged after the model's (the improvement entry points' conditioners)."""
    saved = None if (opt.config and opt.ckpt_path) else saved_run_config(opt.embedding_path)
    if not opt.config or not opt.ckpt_path:
        if saved is None:
            raise UsageError(NO_MODEL if not (opt.config or opt.ckpt_path) else
                             f"{'--ckpt_path' if opt.config else '--config'} is missing: {NO_MODEL}")
    run = run_config(saved) if saved else None
    if not opt.config:
        opt.config = [saved]
    opt.config = list(opt.config) + [o for o in overlays if o not in opt.config]
    sources = [(path, run if run is not None and path == saved else read_config(path)) for path in opt.config]
    config = OmegaConf.merge(*(source for _, source in sources))
    if not opt.ckpt_path:
        opt.ckpt_path = OmegaConf.select(run, "run.actual_resume")
        if not opt.ckpt_path:
            raise UsageError(f"{saved} records no run.actual_resume (the run trained from scratch): give --ckpt_path")
        opt.use_ema = opt.use_ema or bool(OmegaConf.select(run, "run.use_ema"))  # the weights the run trained on
    check_sampling(config, sources)
    defaults = {**FALLBACK_SAMPLING, **(OmegaConf.to_container(config.sampling) if config.get("sampling") else {})}
    for key, value in defaults.items():
        if getattr(opt, key) is None:
            setattr(opt, key, value)
    return config
