"""Small helpers shared by every module: config instantiation, atomic and numbered writes, flag checks, defaults."""
import errno
import importlib
import itertools
import math
import os
import re
import tempfile
import weakref
from contextlib import contextmanager
from inspect import isfunction

import torch

from ldm.cli import UsageError


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


def next_number(folder, prefix="", suffix=""):
    """1 + the largest N of the files named <prefix>N<suffix> in `folder` (N: digits), or 0 where there is none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    found = (pattern.fullmatch(name) for name in os.listdir(folder))
    return max((int(m.group(1)) + 1 for m in found if m), default=0)


def write_numbered(folder, write, prefix="", suffix="", digits=5):
    """write(path) makes a file; it takes the new name `folder/<prefix>NNNNN<suffix>` -> that name.

    The number is the first free one after the largest already there. The name is claimed exclusively: a file
    that has it - one made meanwhile by another process too - is never written over; the next number is taken
    instead, so several processes may write into one folder at once. The content is on the disk before it
    takes the name, and a failed write leaves nothing behind.
    """
    os.makedirs(folder, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=folder, prefix=".new-", suffix=suffix)
    os.close(fd)
    try:
        with atomic_path(staged) as tmp:
            write(tmp)
        number = next_number(folder, prefix, suffix)
        while True:
            path = os.path.join(folder, f"{prefix}{number:0{digits}}{suffix}")
            if claim_name(staged, path):
                return path
            number += 1
    finally:
        if os.path.exists(staged):
            os.remove(staged)


# What link() says on a file system without hard links (FAT, some network and FUSE mounts).
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def claim_name(staged, path):
    """Give the file `staged` the name `path` too, unless a file has it -> whether it did; never replaces a file.

    A hard link fails where the name exists; where the file system has no hard links, the name is created
    exclusively (O_EXCL) and `staged` moved onto it.
    """
    try:
        os.link(staged, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    os.replace(staged, path)
    return True


def require_finite(**flags):
    """Refuse the first --flag whose value (a float) is nan or infinite: one line naming it."""
    for name, value in flags.items():
        if not math.isfinite(value):
            raise UsageError(f"--{name} {value} is not a finite number: give a real value")


def require_positive(**flags):
    """Refuse the first --flag whose value (a count, a size, a temperature) is not above 0: one line naming it."""
    for name, value in flags.items():
        if not value > 0:
            fix = "1 or more" if isinstance(value, int) else "a number above 0"
            raise UsageError(f"--{name} {value} must be greater than 0: give {fix}")


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
