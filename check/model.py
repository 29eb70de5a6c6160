"""What a config builds and what a checkpoint fills: parameter counts, trainable vs frozen, key mismatches.

    python check/model.py --config configs/latent-diffusion/txt2img-1p4B-finetune.yaml
    python check/model.py --config models/ldm/tiny-shapes/finetune.yaml --ckpt models/ldm/tiny-shapes/model.safetensors
Without --ckpt the model is built on the meta device (no memory, no weights), so even the 1.4B
config is checked in seconds.
"""
import functools

import torch

from ldm.checkpoints import load_state_dict_into, read_config
from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.util import instantiate_from_config


def count(module):
    """-> (total, trainable) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def report(model):
    lines = [f"{'module':<22}{'parameters':>16}{'trainable':>14}  mode"]
    for name, child in model.named_children():
        total, trainable = count(child)
        if total:
            lines.append(f"{name:<22}{total:>16,}{trainable:>14,}  {'train' if child.training else 'eval'}")
    total, trainable = count(model)
    lines.append(f"{'total':<22}{total:>16,}{trainable:>14,}")
    return "\n".join(lines)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--ckpt", default=None, help="checkpoint to load (strictly checked, mismatches listed)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    run_command(functools.partial(check, args), args.debug)


def check(args):
    """Print what args.config builds and, with args.ckpt, what the checkpoint fills."""
    config = read_config(args.config)
    if "model" not in config:
        raise UsageError(f"config {args.config} has no model: section: give a model config")
    if args.ckpt:
        model = instantiate_from_config(config.model)
        result = load_state_dict_into(model, args.ckpt, strict=False)
        print(result["summary"])
        for kind in ("missing", "unexpected", "dropped"):
            for key in result[kind][:20]:
                print(f"  {kind}: {key}")
    else:
        with torch.device("meta"):
            model = instantiate_from_config(config.model)
    model.train()  # as Lightning puts it: frozen parts must report eval
    print(report(model))
    if getattr(model, "embedding_manager", None) is not None:
        trainable = model.trainable_parameters()
        print(f"optimizer would hold {len(trainable)} tensor(s), {sum(t.numel() for t in trainable):,} values: "
              f"the embedding manager's vectors only")


if __name__ == "__main__":
    main()
