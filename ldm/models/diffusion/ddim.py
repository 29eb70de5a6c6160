"""DDIMSampler with the reference's `sample(...)` signature, over the functions in `sampling.py`."""
import torch

from ldm.models.diffusion.sampling import DEFAULT_SPACING, SAMPLERS, ddim_schedule, guided_eps


class DDIMSampler:
    sampler = "ddim"

    def __init__(self, model, **kwargs):
        self.model = model

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, eta=0.0, x_T=None, unconditional_guidance_scale=1.0,
               unconditional_conditioning=None, callback=None, log_every_t=100, generator=None, **kwargs):
        """shape: (C, h, w) -> (samples (B, C, h, w), {"x_inter": [...], "pred_x0": [...]}) as the reference."""
        device = (conditioning["crossattn"] if isinstance(conditioning, dict) else conditioning).device
        x = x_T if x_T is not None else torch.randn((batch_size, *shape), generator=generator, device=device)
        sched = ddim_schedule(self.model.alphas_cumprod, S, eta, DEFAULT_SPACING[self.sampler])
        inter = {"x_inter": [x], "pred_x0": [x]}

        def record(step, x_k, pred_x0):
            if step % log_every_t == 0 or step == S - 1:
                inter["x_inter"].append(x_k)
                inter["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(step)

        eps_fn = guided_eps(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        samples = SAMPLERS[self.sampler](eps_fn, x, sched, record, generator)
        return samples, inter
