"""Cache of first-stage posteriors for the few images of a TI run.

The first stage is frozen, so the posterior of an image never changes: it is computed once per
distinct input tensor (an image and its flip are two entries) and a fresh latent is drawn from it
at every step, which is exactly the distribution the uncached path samples. Entries are keyed by
the content of the input: the bytes of the tensor, or a key the dataset gives for it (a digest of the
image as prepared, flipped or not: ldm.data.personalized), which spares copying every batch back from the
GPU to hash it. Either way a change of image, size or augmentation can never hit a stale entry, and
the cache is emptied when the first stage changes (its weights loaded, moved or edited, another
autocast dtype).
"""
import hashlib

import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import FrozenModuleMemo


class LatentCache:
    def __init__(self, first_stage, max_entries=4096):
        self.max_entries = max_entries
        self.moments = FrozenModuleMemo(first_stage)
        self.hits = self.misses = 0
        self.gaussian = True

    @staticmethod
    def key(x):
        """x: (C, H, W) -> content digest."""
        return hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()

    def posterior(self, x, encode, keys=None):
        """x: (B, 3, H, W); encode(x) -> posterior; keys: B str naming each image's content (default: its bytes'
        digest). Returns the batch's posterior, encoding only misses."""
        self.moments.current(x.device)
        keys = [self.key(xi) for xi in x] if keys is None else [f"data:{k}" for k in keys]
        missing = [i for i, k in enumerate(keys) if k not in self.moments]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            params = torch.cat([self._moments(encode(x[i:i + 1])) for i in missing])
            if len(self.moments) + len(missing) > self.max_entries:
                return self._assemble(keys, dict(zip((keys[i] for i in missing), params)))
            for i, p in zip(missing, params):
                self.moments[keys[i]] = p.detach()
        return self._assemble(keys, {})

    def _moments(self, posterior):
        """Encoded one image at a time: an entry never depends on which images shared its batch (a resumed run
        meets the images in other batches, and a convolution's last bits may depend on the batch size)."""
        self.gaussian = isinstance(posterior, DiagonalGaussianDistribution)
        return posterior.parameters if self.gaussian else posterior

    def _assemble(self, keys, extra):
        params = torch.stack([extra[k] if k in extra else self.moments[k] for k in keys])
        return DiagonalGaussianDistribution(params) if self.gaussian else params
