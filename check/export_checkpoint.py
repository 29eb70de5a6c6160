"""Export the weights of a training run (its last.ckpt) as a .safetensors file to ship or to load elsewhere.

    python check/export_checkpoint.py logs/pretrain/<run>_ae --out models/ldm/tiny-shapes/first_stage.safetensors
    python check/export_checkpoint.py logs/pretrain/<run>_ldm --out models/ldm/tiny-shapes/model.safetensors --half

--half stores weights as float16 (schedule buffers stay float32); loading casts them back to float32.
For an autoencoder run it also prints the latent scale factor (1 / std of latents) for the LDM config.
"""
import functools
import os

import torch

from ldm.checkpoints import read_state_dict
from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import atomic_path, instantiate_from_config


def checkpoint_of(path):
    return path if os.path.isfile(path) else os.path.join(path, "checkpoints", "last.ckpt")


def convert(state, half):
    """Tensors to write; each gets its own storage (safetensors refuses tied ones, e.g. T5's two embedding keys)."""
    out = {}
    for key, value in state.items():
        keep = not half or key in SCHEDULE_BUFFERS or not value.is_floating_point()
        out[key] = value.clone().contiguous() if keep else value.half().contiguous()
    return out


def latent_scale_factor(run_dir, n=512):
    """1 / std of an AutoencoderKL run's latents over n training images of its dataset."""
    from glob import glob

    from omegaconf import OmegaConf

    from ldm.checkpoints import load_model_from_config
    from ldm.models.autoencoder import images_from_batch

    configs = sorted(glob(os.path.join(run_dir, "configs", "*-project.yaml")))
    if not configs:
        raise UsageError(f"{run_dir}/configs has no *-project.yaml: the latent scale needs the run's config "
                         "(give the run folder train_new.py wrote)")
    cfg = OmegaConf.load(configs[-1])
    model = load_model_from_config(cfg, checkpoint_of(run_dir))
    dataset = instantiate_from_config(cfg.data.params.train)
    data = [dataset[i] for i in range(min(n, len(dataset)))]
    x = images_from_batch({"image": torch.stack([torch.from_numpy(d["image"]) for d in data])}, "image")
    with torch.no_grad():
        z = model.encode(x).sample()
    return 1.0 / z.flatten().std().item()


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("run", help="run folder (uses checkpoints/last.ckpt) or a checkpoint file")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--half", action="store_true", help="store float weights as float16")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    run_command(functools.partial(export, args), args.debug)


def export(args):
    """Write args.run's weights to args.out; for an autoencoder run folder also print its latent scale factor."""
    from safetensors.torch import save_file

    state, info = read_state_dict(checkpoint_of(args.run))
    with atomic_path(args.out) as tmp:
        save_file(convert(state, args.half), tmp, metadata={"global_step": str(info.get("global_step", ""))})
    print(f"wrote {args.out}: {len(state)} tensors, {os.path.getsize(args.out) / 2**20:.1f} MiB, "
          f"step {info.get('global_step', '?')}")
    is_kl = any(k.startswith("encoder.") for k in state) and not any(k.startswith("quantize.") for k in state)
    if is_kl and os.path.isdir(args.run):  # a VQ first stage's codes need no scale
        print(f"latent scale_factor for the LDM config: {latent_scale_factor(args.run):.5f}")


if __name__ == "__main__":
    main()
