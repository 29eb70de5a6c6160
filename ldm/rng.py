"""The global random generators (Python, NumPy, torch): seeds derived from names, blocks run under a seed of
their own, and their states as values a weights-only checkpoint can hold."""
import hashlib
import random
from contextlib import contextmanager

import numpy as np
import torch


def derived_seed(*parts):
    """A 63-bit seed from any parts (ints, strings): different parts give unrelated seeds."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded_generators(seed, devices=()):
    """Seed Python's, NumPy's and torch's generators (CPU, and the CUDA `devices`) for the block; their states are
    put back after, so that the block neither depends on nor changes what runs around it."""
    py, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        with torch.random.fork_rng(devices=list(devices)):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def random_states():
    """The global generators' states (Python, NumPy, torch CPU and CUDA) as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states):
    """Undo of random_states (a checkpoint may have turned its tuples into lists)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
