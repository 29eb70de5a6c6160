"""Objects from dotted strings, and models from a config plus a checkpoint.

Checkpoints are read without executing pickled code: `.safetensors` directly, `.ckpt`/`.pt`/`.pth`
with `torch.load(weights_only=True)`. Lightning checkpoints of the original projects pickle a few
class references (e.g. a `ModelCheckpoint` callback state); those are replaced by an inert stand-in
instead of being imported.
"""
import logging
import os
import re

import torch

from ldm.util import get_obj_from_str, instantiate_from_config

__all__ = ["get_obj_from_str", "instantiate_from_config", "read_state_dict", "load_state_dict_into",
           "warm_start", "load_model_from_config"]

log = logging.getLogger(__name__)

# Keys a real checkpoint may carry that the config-built model does not have, dropped on load.
IGNORED_CHECKPOINT_KEYS = (
    re.compile(r"^model_ema\."),  # EMA copies (sd-v1-4.ckpt carries decay/num_updates even with use_ema off)
    re.compile(r"^(cond_stage_model\.transformer\.)(text_model\.)?embeddings\.position_ids$"),  # CLIP buffer
    re.compile(r"^(ddim_|model_ema_)"),  # sampler buffers some third-party LDM files saved
)


class _Inert:
    """Stand-in for a class referenced by a checkpoint's pickle: built, never run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _torch_load(path):
    stand_ins = []
    for _ in range(16):
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler names one unsupported global per attempt
            found = re.search(r"(?:Unsupported global: GLOBAL|global) ([\w\.]+)", str(e))
            if not found or found.group(1).startswith(("torch.", "builtins.", "collections.")):
                raise
            stand_ins.append((_Inert, found.group(1)))
    raise RuntimeError(f"{path}: too many unknown classes in the pickle; convert it to .safetensors")


def read_state_dict(path):
    """A Lightning `.ckpt` (its `state_dict`), a bare state dict, or `.safetensors` -> (state_dict, info)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (give the path of a .ckpt or .safetensors file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path), {}
    obj = _torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        info = {k: obj[k] for k in ("global_step", "epoch") if k in obj}
        return obj["state_dict"], info
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"{path} holds no state dict (expected a Lightning checkpoint, a dict of tensors or .safetensors)")


def load_state_dict_into(model, path, strict=True, ignore_prefixes=(), allow_missing_prefixes=("embedding_manager.",)):
    """Load `path` into `model`, dropping documented extras; strict mismatches raise one summary line."""
    sd, info = read_state_dict(path)
    dropped = [k for k in sd if any(p.match(k) for p in IGNORED_CHECKPOINT_KEYS) or k.startswith(tuple(ignore_prefixes))]
    for k in dropped:
        sd.pop(k)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = tuple(allow_missing_prefixes) + tuple(getattr(model, "new_parameter_prefixes", ()))
    missing = [k for k in missing if not k.startswith(allowed)]
    summary = (f"{os.path.basename(path)}: {len(sd)} tensors loaded, {len(missing)} missing, "
               f"{len(unexpected)} unexpected, {len(dropped)} ignored (EMA/buffers)")
    if (missing or unexpected) and strict:
        raise RuntimeError(f"{summary} - checkpoint does not fit this config (another architecture?); "
                           f"missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}")
    log.info(summary)
    if hasattr(model, "on_weights_loaded"):
        model.on_weights_loaded(list(sd))
    return {"missing": missing, "unexpected": unexpected, "dropped": dropped, "summary": summary, **info}


def warm_start(model, path, skip=()):
    """Copy into `model` the tensors of `path` whose names and shapes match, except names starting with `skip`
    (pretraining a related architecture from another's weights); the rest keep their initialisation.
    -> the names copied; one log line with counts."""
    sd, own = read_state_dict(path)[0], model.state_dict()
    shared = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape and not k.startswith(tuple(skip))}
    if not shared:
        raise ValueError(f"warm start from {path}: no tensor fits this model (names or shapes differ everywhere)")
    model.load_state_dict(shared, strict=False)
    log.info(f"warm start from {os.path.basename(path)}: {len(shared)} of {len(own)} tensors copied, "
             f"{len(sd) - len(shared)} of the checkpoint's left out")
    return list(shared)


def load_model_from_config(config, ckpt, strict=True, verbose=False):
    """Build `config.model` (or `config` itself if it has a target) and load `ckpt` into it; eval mode."""
    model_config = config.model if "model" in config else config
    model = instantiate_from_config(model_config)
    if ckpt is not None:
        report = load_state_dict_into(model, ckpt, strict=strict)
        if verbose:
            print(report["summary"])
    return model.eval()
