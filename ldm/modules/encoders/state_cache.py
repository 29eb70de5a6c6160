"""Memoised final states of a frozen text encoder, one entry per distinct row of token ids.

With output injection a TI run encodes the same few dozen captions at every step through an encoder
that never changes, and no gradient flows through it: its states are a function of the ids it looks up.
The cache is emptied whenever that function may have changed: the encoder's weights replaced or edited
in place (a tensor's storage or version counter moved: loading a checkpoint, `.to()`), another device,
or another autocast dtype. An encoder with any module in training mode (dropout) is never cached.
"""
import torch

from ldm.util import FrozenModuleMemo, memoised_rows


class StateCache:
    """`cache(ids, compute)`: ids (B, T) int64 -> states (B, T, D), running `compute` on the rows not seen."""

    def __init__(self, encoder, max_rows=4096):
        self.encoder = encoder
        self.max_rows = max_rows
        self.rows = FrozenModuleMemo(encoder)

    def __call__(self, ids, compute):
        """ids: (B, T) int64, compute: (N, T) ids -> (N, T, D) states -> (B, T, D), a new tensor."""
        if torch.is_grad_enabled() or any(m.training for m in self.encoder.modules()):
            return compute(ids)
        keys = [row.tobytes() for row in ids.cpu().numpy()]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        rows = self.rows.current(ids.device)
        # one row at a time: a row's states never depend on the rows it first met (a resumed run meets it in
        # other batches, and a product's last bits may depend on the batch size)
        return memoised_rows(rows, keys, lambda missing: torch.cat([compute(ids[first[k]][None]) for k in missing]),
                             self.max_rows)
