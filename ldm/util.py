"""Small helpers shared by every module: config instantiation, atomic writes, defaults."""
import importlib
import itertools
import os
import tempfile
import weakref
from contextlib import contextmanager
from inspect import isfunction

import torch


def exists(x):
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if isfunction(d) else d


def count_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def get_obj_from_str(string, reload=False):
    """Import `pkg.module.Name` and return `Name`; one clear line when it does not import."""
    module, _, cls = string.rpartition(".")
    if not module:
        raise ValueError(f"target '{string}' is not a dotted path like 'ldm.models.autoencoder.AutoencoderKL'")
    try:
        mod = importlib.import_module(module)
        if reload:
            mod = importlib.reload(mod)
    except ImportError as e:
        raise ImportError(f"cannot import module '{module}' for target '{string}': {e}") from e
    if not hasattr(mod, cls):
        raise ImportError(f"module '{module}' has no attribute '{cls}' (target '{string}')")
    return getattr(mod, cls)


def instantiate_from_config(config, **overrides):
    """Build `config.target(**config.params, **overrides)`.

    The two sentinel strings of latent-diffusion configs stand for "no module".
    """
    if config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if "target" not in config:
        raise KeyError(f"config node has no 'target' key: {dict(config) if hasattr(config, 'keys') else config}")
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    return get_obj_from_str(config["target"])(**params)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it over `path`.

    A crash mid-write leaves the previous file intact and no half-written file behind.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on the disk before it takes the name: a crash leaves the old file or the new one
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def memoised_rows(memo, keys, compute, limit):
    """Rows of `keys` from `memo` (a dict key -> tensor row, filled in place) -> (len(keys), ...), a new tensor.

    compute(missing keys, in first-seen order) -> (N, ...) makes the rows not in `memo`; the memo is emptied
    first when they would take it past `limit` entries.
    """
    missing = [k for k in dict.fromkeys(keys) if k not in memo]
    if missing:
        if len(memo) + len(missing) > limit:
            memo.clear()
        memo.update(zip(missing, compute(missing)))
    return torch.stack([memo[k] for k in keys])


def autocast_dtype(device_type):
    """The dtype autocast casts to on `device_type` ("cpu", "cuda"), or None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


_SUBMODULES = weakref.WeakKeyDictionary()


def module_stamp(module, device):
    """What a memo of a frozen module's outputs depends on: the device, the autocast dtype there, and where each
    parameter and buffer lives and its version counter (loading a checkpoint, `.to()` or an in-place edit moves
    them). A memo is stale when the stamp differs from the one it was filled under. The module's submodules are
    listed once (its tensors are read afresh each time, so a replaced parameter counts)."""
    if module not in _SUBMODULES:
        _SUBMODULES[module] = list(module.modules())[1:]  # not the module itself: the entry would keep it alive
    modules = [module, *_SUBMODULES[module]]
    tensors = (t for m in modules for t in itertools.chain(m._parameters.values(), m._buffers.values()))
    return str(device), autocast_dtype(device.type), tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


class FrozenModuleMemo(dict):
    """A dict of what a frozen `module` computed, emptied whenever its module_stamp moves."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.stamp = None

    def current(self, device):
        """-> self, emptied first if the module or the autocast dtype on `device` changed since it was filled."""
        stamp = module_stamp(self.module, device)
        if stamp != self.stamp:
            self.clear()
            self.stamp = stamp
        return self
