"""Checkpoints: reading weights safely, loading them into a model strictly, and models from a config plus a checkpoint.

Checkpoints are read without executing pickled code: `.safetensors` directly, `.ckpt`/`.pt`/`.pth`
with `torch.load(weights_only=True)`. Lightning checkpoints of the original projects pickle a few
class references (e.g. a `ModelCheckpoint` callback state); those are replaced by an inert stand-in
instead of being imported. A pickle that calls anything but torch's tensor and container builders
(os.system, eval, a class to instantiate) is refused, as is an empty, damaged or foreign file: one
line naming the file (CheckpointError).
"""
import _compat_pickle
import logging
import os
import pickle
import pickletools
import re

import torch

from ldm.cli import UsageError, one_line
from ldm.config_check import load_config_file as read_config  # the commands' config reader: one line per mistake
from ldm.util import get_obj_from_str, instantiate_from_config

__all__ = ["get_obj_from_str", "instantiate_from_config", "read_config", "CheckpointError", "checkpoint_format",
           "read_state_dict", "read_model_weights", "ema_weights", "check_model_path", "load_state_dict_into",
           "warm_start", "load_model_from_config"]

log = logging.getLogger(__name__)

# Keys a real checkpoint may carry that the config-built model does not have, dropped on load.
IGNORED_CHECKPOINT_KEYS = (
    re.compile(r"^model_ema\."),  # EMA copies (sd-v1-4.ckpt carries decay/num_updates even with use_ema off)
    re.compile(r"^(cond_stage_model\.transformer\.)(text_model\.)?embeddings\.position_ids$"),  # CLIP buffer
    re.compile(r"^(ddim_|model_ema_)"),  # sampler buffers some third-party LDM files saved
)


class CheckpointError(UsageError):
    """A checkpoint that cannot be read as weights: a folder, empty, damaged, not a checkpoint, or pickling code."""


class PickledCall(Exception):
    """A checkpoint's pickle tried to call (build an object of) the class or function it names."""


class _Inert:
    """Stand-in for a class a checkpoint's pickle refers to (e.g. a callback-state key): it may sit in the loaded
    object, but it is never imported and never called - a call raises PickledCall, so nothing pickled runs."""

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        raise PickledCall(cls.pickled_name)


def _stand_in(name):
    """A new stand-in class for the global `name`."""
    return type("_Inert", (_Inert,), {"pickled_name": name, "__slots__": ()})


# Most stand-ins one load may need (each costs one more pass over the pickle).
MAX_STAND_INS = 16
# What torch's weights-only unpickler says of a global it does not allow, and of one whose module it never allows.
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) whose module \w+ is blocked")


def _pickles_code(path, name):
    return CheckpointError(f"{path} pickles code ({python_name(name)}); loading never runs pickled code: convert it "
                           "to .safetensors")


def python_name(name):
    """A global as a pickle names it -> as Python 3 code names it: protocol 2 writes Python 2 modules (commands for
    subprocess), os functions under their platform module (posix.system), builtins without a module."""
    module, _, attr = name.rpartition(".")
    module = {"posix": "os", "nt": "os", "": "builtins"}.get(module, _compat_pickle.IMPORT_MAPPING.get(module, module))
    return f"{module}.{attr}"


def _damaged(path, why):
    return CheckpointError(f"{path} is truncated or damaged ({why}): save, download or copy it again")


def _torch_load(path):
    """torch.load(weights_only=True), the classes the pickle refers to replaced by stand-ins; one clear
    CheckpointError where the file pickles a call, an object other than tensors and containers, or is damaged."""
    stand_ins = []
    while len(stand_ins) <= MAX_STAND_INS:
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        except PickledCall as e:
            raise _pickles_code(path, e.args[0]) from e
        except pickle.UnpicklingError as e:
            name = _stand_in_name(e)
            if name is None or name in (known for _, known in stand_ins):
                raise _refusal(path, e) from e
            stand_ins.append((_stand_in(name), name))
        except (EOFError, RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise _damaged(path, one_line(e).split(". ")[0]) from e
    raise CheckpointError(f"{path} refers to more than {MAX_STAND_INS} classes other than tensors and containers: "
                          "convert it to .safetensors")


def _stand_in_name(error):
    """The global torch refused in `error` where a stand-in may replace it, else None: a dotted name outside torch
    and the builtins (torch names those without a module); a torch global torch does not allow is an object."""
    found = UNSUPPORTED_GLOBAL.search(str(error))
    name = found and found.group(1)
    return name if name and "." in name and not name.startswith(("torch.", "builtins.")) else None


def _refusal(path, error):
    """The CheckpointError of an UnpicklingError no stand-in answers: a global the file may not use (code), a
    truncated pickle, an opcode torch.save never writes (another kind of file), or an object built otherwise."""
    text = str(error)
    found = BLOCKED_GLOBAL.search(text) or UNSUPPORTED_GLOBAL.search(text)
    if found:
        return _pickles_code(path, found.group(1))
    if "truncated" in text:
        return _damaged(path, "the pickle ends early")
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return CheckpointError(f"{path} is damaged or not a torch checkpoint (its pickle holds opcode "
                               f"{found.group(1)}, which torch.save never writes): give a .ckpt, .pt or .safetensors "
                               "file of weights")
    return CheckpointError(f"{path} pickles objects other than tensors and plain containers; loading never runs "
                           "pickled code: convert it to .safetensors")


def _legacy_pickles_complete(path):
    """Whether the five pickles that open a legacy (before torch 1.6) torch.save file all reach their end: a file
    cut inside them can end in a truncated name that reads as a global."""
    with open(path, "rb") as f:
        try:
            for _ in range(5):
                for _ in pickletools.genops(f):
                    pass
        except ValueError:
            return False
    return True


# How a legacy torch.save file starts: the pickle (protocol 2) of torch's magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def checkpoint_format(path):
    """"safetensors", "zip" (torch.save) or "legacy" (torch.save before 1.6), told by content (a .safetensors name
    counts too); a missing file, a folder, an empty or unreadable file or any other file -> one clear error."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a file: give the .ckpt or .safetensors file in it, "
                              "or a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (give the path of a .ckpt or .safetensors file)")
    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_MAGIC))
    except PermissionError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied; make it readable") from e
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the save or copy was interrupted; "
                              "save, download or copy it again")
    if head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head == LEGACY_MAGIC:
        return "legacy"
    if path.endswith(".safetensors"):
        return "safetensors"
    raise CheckpointError(f"{path} is not a checkpoint (neither a torch.save .ckpt/.pt file nor .safetensors): "
                          "give the model's weights file")


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as e:
        raise _damaged(path, f"its safetensors header or data do not read: {one_line(e)}") from e


def _state_dict_of(path, obj):
    """A loaded checkpoint object -> (state_dict, info with global_step and epoch where the file has them)."""
    info = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        info = {k: obj[k] for k in ("global_step", "epoch") if isinstance(obj.get(k), int)}
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        raise CheckpointError(f"{path} holds no state dict (expected a Lightning checkpoint, a dict of tensors "
                              "or .safetensors)")
    return obj, info


def read_state_dict(path):
    """A Lightning `.ckpt` (its `state_dict`), a bare state dict, or `.safetensors` -> (state_dict, info).

    Never runs pickled code; a file that cannot be read as weights raises one line naming it (CheckpointError).
    """
    kind = checkpoint_format(path)
    if kind == "safetensors":
        return _state_dict_of(path, _read_safetensors(path))
    if kind == "legacy" and not _legacy_pickles_complete(path):
        raise _damaged(path, "its pickles end early")
    return _state_dict_of(path, _torch_load(path))


def check_model_path(path, flag):
    """Refuse, before a model is built, a `flag` value (--ckpt_path, --actual_resume) that is neither a readable
    checkpoint file nor a diffusers pipeline folder: one line."""
    from ldm.diffusers_layout import is_diffusers_folder

    if not os.path.exists(path):
        raise UsageError(f"{flag} {path} not found: give the model's .ckpt or .safetensors file or its diffusers "
                         "folder")
    if not is_diffusers_folder(path):
        checkpoint_format(path)


def read_model_weights(path, use_ema=False):
    """The weights of a whole model in our (LDM) key names -> (state_dict, info): a checkpoint file as
    read_state_dict reads it, or a diffusers SD 1.x folder converted in memory (ldm.diffusers_layout).

    A file holding both `model.*` and its EMA copies `model_ema.*` gives `model.*`, as the original scripts do;
    use_ema=True gives the EMA copies instead (all of them, or one line: never a mix)."""
    from ldm.diffusers_layout import is_diffusers_folder, read_diffusers_folder

    if is_diffusers_folder(path):
        if use_ema:
            raise UsageError(f"{path} is a diffusers folder, which holds one set of UNet weights and no EMA copies: "
                             "leave out --use_ema")
        return read_diffusers_folder(path), {}
    sd, info = read_state_dict(path)
    if use_ema:
        return ema_weights(path, sd), info
    if any(k.startswith("model_ema.") and k not in EMA_COUNTERS for k in sd):
        log.info("%s holds EMA copies of the UNet: using its model.* weights (--use_ema for the EMA ones)",
                 os.path.basename(path))
    return sd, info


EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")


def ema_weights(path, sd):
    """`sd` with every `model.*` tensor replaced by its EMA copy: LitEma stores model.a.b.c as model_ema.abc
    (dots removed). A file without a copy of each -> one line."""
    names = [k for k in sd if k.startswith("model.")]
    copies = {k: "model_ema." + k[len("model."):].replace(".", "") for k in names}
    lacking = [k for k in names if copies[k] not in sd]
    if not names or lacking:
        what = f"EMA copy (model_ema.*) of {lacking[0]}" if lacking else "UNet weights (model.*)"
        raise CheckpointError(f"{path} has no {what}: leave out --use_ema to use the weights it has")
    out = {k: v for k, v in sd.items() if not k.startswith(("model.", "model_ema."))}
    out.update({k: sd[copies[k]] for k in names})
    return out


def load_state_dict_into(model, path, strict=True, ignore_prefixes=(), allow_missing_prefixes=("embedding_manager.",),
                         use_ema=False):
    """Load `path` (a checkpoint file or a diffusers folder) into `model`, dropping documented extras; strict
    mismatches raise one summary line. use_ema: the file's EMA UNet weights instead of model.* (read_model_weights).
    Tensors saved in another precision (fp16) are copied into the model's own dtype."""
    sd, info = read_model_weights(path, use_ema)
    dropped = [k for k in sd
               if any(p.match(k) for p in IGNORED_CHECKPOINT_KEYS) or k.startswith(tuple(ignore_prefixes))]
    for k in dropped:
        sd.pop(k)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = tuple(allow_missing_prefixes) + tuple(getattr(model, "new_parameter_prefixes", ()))
    computed = computed_buffers(model, path)
    missing = [k for k in missing if not k.startswith(allowed) and k not in computed]
    summary = (f"{os.path.basename(os.path.normpath(path))}: {len(sd)} tensors loaded, {len(missing)} missing, "
               f"{len(unexpected)} unexpected, {len(dropped)} ignored (EMA/buffers)")
    if (missing or unexpected) and strict:
        raise UsageError(f"{summary} - checkpoint does not fit this config (another architecture?); "
                           f"missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}")
    log.info(summary)
    if hasattr(model, "on_weights_loaded"):
        model.on_weights_loaded(list(sd))
    return {"missing": missing, "unexpected": unexpected, "dropped": dropped, "summary": summary, **info}


def computed_buffers(model, path):
    """The model's buffers a diffusers folder has no copy of (the diffusion schedule: the config computes it), else
    none: a checkpoint file carries them."""
    from ldm.diffusers_layout import is_diffusers_folder

    return {name for name, _ in model.named_buffers()} if is_diffusers_folder(path) else set()


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


def prepare_model_config(model_config, ckpt):
    """Adapt a model config (edited in place) to the weights it will load: a diffusers folder's tokenizer."""
    from ldm.diffusers_layout import is_diffusers_folder, prepare_config

    if ckpt is not None and is_diffusers_folder(ckpt):
        prepare_config(model_config, os.fspath(ckpt))


def load_model_from_config(config, ckpt, strict=True, verbose=False, use_ema=False):
    """Build `config.model` (or `config` itself if it has a target) and load `ckpt` (a checkpoint file or a
    diffusers folder) into it; eval mode."""
    model_config = config.model if "model" in config else config
    prepare_model_config(model_config, ckpt)
    model = instantiate_from_config(model_config)
    if ckpt is not None:
        report = load_state_dict_into(model, ckpt, strict=strict, use_ema=use_ema)
        if verbose:
            print(report["summary"])
    return model.eval()
