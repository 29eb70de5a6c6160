"""PLMSSampler: the reference's interface, PLMS update from `sampling.py` (eta must be 0)."""
from ldm.models.diffusion.ddim import DDIMSampler


class PLMSSampler(DDIMSampler):
    sampler = "plms"

    def sample(self, S, batch_size, shape, eta=0.0, **kwargs):
        if eta != 0:
            raise ValueError("PLMS is deterministic: eta must be 0")
        return super().sample(S, batch_size, shape, eta=0.0, **kwargs)
