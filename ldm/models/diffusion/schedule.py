"""Noise schedules of DDPM, computed in float64 and stored as float32 buffers (as the reference), and the
conversions between the model targets eps, x0 and v = sqrt(ac) eps - sqrt(1 - ac) x0 (Salimans & Ho, 2022).
"""
import math

import torch
from torch import nn

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """-> betas: (n_timestep,) float64."""
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    if schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    raise ValueError(f"unknown beta schedule '{schedule}' (use linear, cosine, sqrt_linear or sqrt)")


PARAMETERIZATIONS = ("eps", "v")  # what the model predicts


def schedule_tensors(betas, v_posterior=0.0, parameterization="eps"):
    """betas: (T,) float64 -> dict of the twelve DDPM buffers (float64) plus `lvlb_weights` (ones for v, as the
    reference)."""
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    post_var = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    out = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - ac), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(post_var.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    lvlb = betas ** 2 / (2 * post_var * alphas * (1 - ac))
    if parameterization == "v":
        lvlb = torch.ones_like(lvlb)
    lvlb[0] = lvlb[1]
    out["lvlb_weights"] = lvlb
    return out


class NoiseSchedule(nn.Module):
    """Holds the schedule buffers under the reference names; `q_sample` draws x_t ~ q(x_t | x_0), and the
    v-parameterisation's conversions use the float32 buffers as the reference does."""

    def register_schedule(self, beta_schedule="linear", timesteps=1000, linear_start=1e-4, linear_end=2e-2,
                          cosine_s=8e-3, given_betas=None, v_posterior=0.0, parameterization="eps"):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization '{parameterization}' is not supported: use one of "
                             f"{', '.join(PARAMETERIZATIONS)}")
        self.parameterization = parameterization
        betas = (torch.as_tensor(given_betas, dtype=torch.float64) if given_betas is not None
                 else make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        tensors = schedule_tensors(betas, v_posterior, parameterization)
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, tensors[name].float())
        self.register_buffer("lvlb_weights", tensors["lvlb_weights"].float(), persistent=False)

    def _coefficients(self, t, x):
        """t: (B,) int, x: (B, ...) -> sqrt(ac[t]), sqrt(1 - ac[t]), each (B, 1, ..., 1) in x's dtype."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (self.sqrt_alphas_cumprod[t].view(shape).to(x.dtype),
                self.sqrt_one_minus_alphas_cumprod[t].view(shape).to(x.dtype))

    def q_sample(self, x0, t, noise):
        """x0, noise: (B, ...), t: (B,) int -> x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise."""
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def get_v(self, x0, noise, t):
        """x0, noise: (B, ...), t: (B,) int -> v = sqrt(ac[t]) noise - sqrt(1 - ac[t]) x0 (the v-model's target)."""
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0

    def predict_start_from_z_and_v(self, x_t, t, v):
        """x_t, v: (B, ...), t: (B,) int -> x0 = sqrt(ac[t]) x_t - sqrt(1 - ac[t]) v."""
        a, s = self._coefficients(t, x_t)
        return a * x_t - s * v

    def predict_eps_from_z_and_v(self, x_t, t, v):
        """x_t, v: (B, ...), t: (B,) int -> eps = sqrt(ac[t]) v + sqrt(1 - ac[t]) x_t."""
        a, s = self._coefficients(t, x_t)
        return a * v + s * x_t

    def training_target(self, x0, noise, t):
        """What the model learns to output for x_t = q_sample(x0, t, noise): noise for eps, get_v for v."""
        return noise if self.parameterization == "eps" else self.get_v(x0, noise, t)
