"""An exponential moving average of a TI run's vectors: what the run saves, samples and is judged by.

A run at a constant rate ends wherever its last noisy step left the vectors (on the shapes world, after 300 steps
at lr 0.015, the last step's vectors lie about a tenth of their norm from this average); the average of the
recent steps sits in the middle of that jitter. The decay warms up as LDM's LitEma does: the n-th update uses

    decay_n = min(decay, (1 + n) / (10 + n))

so early on the average follows the vectors closely, and after n steps it spans about the last n / 10 of them
whatever `decay` is, until decay_n reaches `decay` (n = 9,000 for 0.999).
"""
import contextlib

import torch
from torch import nn


def check_decay(value):
    """embedding_ema: 0 (off: the vectors of the last step) or a decay in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value == 0 or 0 < value < 1):
        raise ValueError(f"embedding_ema={value!r} is not a decay: use 0 (off) or a value in (0, 1), e.g. 0.999")
    return float(value)


class VectorEMA(nn.Module):
    """Shadow copies of a manager's vectors, `shadow_<k>`: (n_k, D) for its k-th placeholder, plus `num_updates`.

    Buffers, so a run's last.ckpt carries them and a resumed run averages on exactly as before.
    """

    def __init__(self, manager, decay):
        super().__init__()
        self.decay = check_decay(decay)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        params = manager.embedding_parameters()
        for k, p in enumerate(params):
            self.register_buffer(f"shadow_{k}", p.detach().clone())
        self.count = len(params)

    def shadows(self):
        return [getattr(self, f"shadow_{k}") for k in range(self.count)]

    @torch.no_grad()
    def update(self, manager):
        """Blend the manager's current vectors into the shadows (after an optimizer step)."""
        self.num_updates += 1
        n = int(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for shadow, p in zip(self.shadows(), manager.embedding_parameters()):
            shadow.lerp_(p.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self, manager):
        """Within: the manager's vectors hold the averages; after: the trained vectors again, bit for bit."""
        params = manager.embedding_parameters()
        kept = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, shadow in zip(params, self.shadows()):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, kept):
                    p.copy_(value)
