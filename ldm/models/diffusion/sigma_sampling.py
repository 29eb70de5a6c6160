"""sgm's view of a discrete eps-model: noise levels sigma = sqrt((1 - ac) / ac), its DiscreteDenoiser and two of its
samplers (EulerEDMSampler without churn, DPMPP2MSampler), as functions over an eps-model.

With x = x_t / sqrt(ac_t) (the variance-exploding scale) the denoised estimate is
    D(x, sigma) = x - sigma_q * eps(x / sqrt(sigma_q^2 + 1), t_q),
where t_q is the training timestep whose sigma is nearest to sigma (the UNet sees that integer) and sigma_q its
sigma. Sigmas are computed as sgm does: (1 - ac) / ac in float64, cast to float32, then the square root.
"""
import numpy as np
import torch
from torch import nn


def legacy_sigmas(alphas_cumprod):
    """alphas_cumprod: (T,) -> (T,) float32 sigmas, ascending with t."""
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).float().sqrt()


def legacy_timesteps(num_train_steps, steps):
    """sgm's LegacyDDPMDiscretization grid, ascending: linspace(T - 1, 0, S, endpoint=False) as ints
    (999, 799, ..., 199 for S = 5)."""
    if not 0 < steps <= num_train_steps:
        raise ValueError(f"number of sampling steps must be in 1..{num_train_steps}, got {steps}")
    return torch.from_numpy(np.linspace(num_train_steps - 1, 0, steps, endpoint=False).astype(np.int64)[::-1].copy())


class DiscreteDenoiser(nn.Module):
    """sgm's `denoiser` (EpsScaling, LegacyDDPMDiscretization): holds `sigmas` (T,), not saved; a checkpoint's
    `denoiser.sigmas` is accepted when it equals them and dropped."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("sigmas", legacy_sigmas(alphas_cumprod), persistent=False)
        self.register_load_state_dict_pre_hook(self._check_sigmas)

    def _check_sigmas(self, module, state_dict, prefix, *args):
        stored = state_dict.pop(prefix + "sigmas", None)
        if stored is not None and not torch.equal(stored.float().cpu(), self.sigmas.cpu()):
            raise ValueError(f"{prefix}sigmas of the checkpoint differ from this model's noise schedule "
                             "(linear_start, linear_end, timesteps): the checkpoint was trained with another one")

    def sigma_to_idx(self, sigma):
        """sigma: (B,) -> (B,) int64, the timestep of the nearest sigma."""
        return (sigma[:, None] - self.sigmas.to(sigma.device)[None]).abs().argmin(dim=1)

    def forward(self, eps_model, x, sigma, c):
        """eps_model.apply_model(x_t, t, c) -> eps; x: (B, C, h, w) at noise level sigma: (B,) -> D: (B, C, h, w)."""
        idx = self.sigma_to_idx(sigma)
        s = self.sigmas.to(x.device)[idx].to(x.dtype)[:, None, None, None]
        return x + eps_model.apply_model(x * (1 / (s ** 2 + 1.0) ** 0.5), idx, c) * -s


def _sigma_grid(sched):
    """A schedule of `ddim_schedule` -> (sigmas (S + 1,) float32 descending with 0 last, timesteps (S,) descending)."""
    a = sched["a"].flip(0)
    return torch.cat([((1 - a) / a).float().sqrt(), torch.zeros(1)]), sched["timesteps"].flip(0)


def _denoise(eps_fn, x, sigma, t):
    """D(x, sigma) at the grid's sigma (a float32 scalar tensor) and timestep t."""
    s = sigma.to(x.device, x.dtype)
    tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    return x + eps_fn(x * (1 / (s ** 2 + 1.0) ** 0.5), tt) * -s


@torch.no_grad()
def sample_euler(eps_fn, x, sched, callback=None, generator=None):
    """sgm's EulerEDMSampler (s_churn 0): x_T (B, C, h, w) ~ N(0, 1) -> x_0;
    x <- x + (sigma_next - sigma) (x - D) / sigma, starting from x_T sqrt(1 + sigma_0^2)."""
    sigmas, ts = _sigma_grid(sched)
    sigmas = sigmas.to(x.device)
    x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    for k in range(len(ts)):
        d = _denoise(eps_fn, x, sigmas[k], ts[k])
        x = x + (sigmas[k + 1] - sigmas[k]) * ((x - d) / sigmas[k])
        if callback is not None:
            callback(k, x, d)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sigma(eps_fn, x, sched, callback=None, generator=None):
    """sgm's DPMPP2MSampler: with t = -log(sigma), h = t_next - t,
    x <- (sigma_next / sigma) x - expm1(-h) D', D' = (1 + 1/(2r)) D - 1/(2r) D_prev (r = h_prev / h) from the
    second step on while sigma_next > 0; the last step, to sigma 0, returns D."""
    sigmas, ts = _sigma_grid(sched)
    sigmas = sigmas.to(x.device)
    x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    old_d = None
    for k in range(len(ts)):
        d = _denoise(eps_fn, x, sigmas[k], ts[k])
        t, t_next = -sigmas[k].log(), -sigmas[k + 1].log()
        h = t_next - t
        ratio, mult = t_next.neg().exp() / t.neg().exp(), (-h).expm1()
        x_new = ratio * x - mult * d
        if old_d is not None and sigmas[k + 1] > 0:
            r = (t + sigmas[k - 1].log()) / h
            x_new = ratio * x - mult * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old_d)
        x, old_d = x_new, d
        if callback is not None:
            callback(k, x, d)
    return x
