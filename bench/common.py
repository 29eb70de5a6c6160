"""Shared pieces of the benchmarks: building the model both ways, timing, peak memory."""
import os
import resource
import statistics
import time

import torch
from omegaconf import OmegaConf

from ldm.checkpoints import load_state_dict_into
from ldm.implementation import OURS, REFERENCE, using
from ldm.util import instantiate_from_config

PERSONALIZATION = {"target": "ldm.modules.embedding_manager.EmbeddingManager",
                   "params": {"placeholder_strings": ["*"], "initializer_words": ["dog"]}}


def load_config(paths, overrides=()):
    config = OmegaConf.merge(*[OmegaConf.load(p) for p in paths], OmegaConf.from_dotlist(list(overrides)))
    if config.model.params.get("personalization_config") is None:
        config.model.params.personalization_config = PERSONALIZATION
    return config


def build(config, ckpt, ours, device):
    """The TI model as we run it (`ours`) or as the original code runs it; same weights either way.

    Original: no latent cache (first stage re-encodes every step), no gradient checkpointing, no recomputed
    projections, tensors in PyTorch's default layout.
    Ours: the cache, and the checkpointing, recomputed projections, channels_last, torch.compile, timestep bands and
    injection point the config asks for (UNet, and LDM BERT where it has the option). The original holds one set of
    vectors at the encoder's input.
    Frozen weights have requires_grad=False in both, as the original freezes them.
    """
    params = config.model.params
    if not ours and params.get("personalization_config") is not None:
        OmegaConf.update(params, "personalization_config.params.timestep_bands", [], merge=False)
        OmegaConf.update(params, "personalization_config.params.injection", "input", merge=False)
    params.latent_cache = bool(ours)
    for option, default in (("compile", False), ("channels_last", False), ("recompute_projections", True)):
        params[option] = bool(ours) and bool(params.get(option, default))
    for node in (params.unet_config.params, params.cond_stage_config.get("params")):
        if node is not None and "use_checkpoint" in node:
            node.use_checkpoint = bool(ours) and bool(node.use_checkpoint)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    if ckpt:
        load_state_dict_into(model, ckpt)
    return model.to(device).train()


def implementation(ours):
    """A block that runs our implementation (`ours`) or the original code's: every switch of
    `ldm.implementation.Implementation` off (einsum attention, autograd's convolutions and GEGLU, 1x1 convolutions,
    images read and captions tokenized at every step)."""
    return using(OURS if ours else REFERENCE)


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _vm_hwm_mib():
    """The process's resident-set high-water mark (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux: 5 > /proc/self/clear_refs); where that is not possible
    the high-water mark stays the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib():
    """RSS high-water mark since the last reset_peak_rss() (or since the start where that failed)."""
    try:
        return _vm_hwm_mib()
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device, run):
    """Peak memory above the level before `run()`: CUDA allocator peak, or the process's RSS high-water
    mark, reset just before `run()` so that warm-up and cache filling do not count."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    base = rss_mib()
    reset_peak_rss()
    run()
    return max(0.0, peak_rss_mib() - base)
