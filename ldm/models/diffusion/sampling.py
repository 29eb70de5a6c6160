"""Samplers as small functions over an eps-model, a start tensor and a schedule.

`eps_fn(x, t) -> eps` with x: (B, C, h, w) and t: (B,) int64. Classifier-free guidance is a wrapper
around the model (one batched forward for both halves), not a sampler option; the same wrapper turns a
v-prediction model's output into eps (as the reference's DDIM and DPM-Solver do), so every sampler runs on eps.
"""
import math

import numpy as np
import torch

from ldm.models.diffusion.prompt_edits import schedule as prompt_schedule
from ldm.models.diffusion.sigma_sampling import legacy_timesteps, sample_dpmpp_2m_sigma, sample_euler
from ldm.modules.attention import reuse_context_projections


def ddim_timesteps(num_train_steps, steps):
    """Uniform DDIM discretisation of the reference: range(0, T, T // S) + 1 (ascending, int64).

    Where T // S does not divide T the reference's list can end at T, one past the schedule (S = 3:
    1, 334, 667, 1000), and indexing fails; that entry is dropped.
    """
    if not 0 < steps <= num_train_steps:
        raise ValueError(f"number of sampling steps must be in 1..{num_train_steps}, got {steps}")
    ts = np.arange(0, num_train_steps, num_train_steps // steps) + 1
    return torch.from_numpy(ts[ts < num_train_steps]).long()


def logsnr_timesteps(alphas_cumprod, steps):
    """`steps` timesteps (ascending, int64) from 1 to T - 1, evenly spaced in log-SNR, lambda = log(alpha / sigma).

    Uniform steps in t leave one long stride in lambda at the end (t = 51 -> 1 is 1.7 of lambda's 5.9 at 20 steps),
    where a multistep solver extrapolates far; even strides in lambda are what DPM-Solver's error bound assumes.
    Each target is the nearest integer t; near t = 0, where lambda moves faster than the grid, ties are nudged apart.
    """
    num_train_steps = alphas_cumprod.shape[0]
    if not 0 < steps < num_train_steps:
        raise ValueError(f"number of sampling steps must be in 1..{num_train_steps - 1}, got {steps}")
    ac = alphas_cumprod.double().cpu()
    lam = 0.5 * (ac / (1 - ac)).log()
    targets = torch.linspace(float(lam[1]), float(lam[-1]), steps, dtype=torch.float64)
    ts = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
    for i in range(1, steps):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    for i in reversed(range(steps - 1)):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return torch.tensor(ts, dtype=torch.long)


SPACINGS = {"uniform": lambda ac, steps: ddim_timesteps(ac.shape[0], steps), "logsnr": logsnr_timesteps,
            "legacy": lambda ac, steps: legacy_timesteps(ac.shape[0], steps)}


def ddim_schedule(alphas_cumprod, steps, eta=0.0, spacing="uniform"):
    """-> dict(timesteps (S,), a (S,), a_prev (S,), sigma (S,)) in float64; a_prev[0] = alphas_cumprod[0].

    spacing: "uniform" (the reference's DDIM and PLMS grid), "logsnr" (even strides in log-SNR) or "legacy" (sgm's
    LegacyDDPMDiscretization: 999, 799, ... for 5 steps)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing '{spacing}' (use one of {', '.join(SPACINGS)})")
    ts = SPACINGS[spacing](alphas_cumprod, steps)
    ac = alphas_cumprod.double().cpu()
    a = ac[ts]
    a_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return {"timesteps": ts, "a": a, "a_prev": a_prev, "sigma": sigma}


def guided_eps(model, c, uc=None, scale=1.0, edges=()):
    """eps_fn for model.apply_model with classifier-free guidance: e_uc + s (e_c - e_uc), one forward.

    Guidance combines the model's outputs; for a v-model (`model.parameterization == "v"`) these are v, as in
    the reference, and the guided v becomes eps = sqrt(ac) v + sqrt(1 - ac) x_t (`predict_eps_from_z_and_v`).

    c: (B, T, D) (or SDXL's dict of them: {"crossattn", "vector"}), or a list of them, one per timestep band of
    the model's embedding manager (a step uses its band's). With prompt edits (edges: ascending timesteps,
    `prompt_edits.schedule`), a list of those, one per segment of t between the edges. Each context is the same at
    every step that uses it, so its cross-attention keys and values are computed once.
    """
    guided = uc is not None and scale != 1.0
    segments = list(c) if edges else [c]
    bands = [list(s) if isinstance(s, (list, tuple)) else [s] for s in segments]
    contexts = [[_cat(uc, b) if guided else b for b in s] for s in bands]
    projections = [[{} for _ in s] for s in bands]
    edge_tensor = torch.tensor(list(edges), dtype=torch.long)

    def output_fn(x, t):
        i = int(torch.bucketize(t[:1].cpu(), edge_tensor, right=True)) if edges else 0
        k = int(model.timestep_band(t[:1])) if len(bands[i]) > 1 else 0
        with reuse_context_projections(projections[i][k]):
            if not guided:
                return model.apply_model(x, t, contexts[i][k])
            e_uc, e_c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), contexts[i][k]).chunk(2)
        return e_uc + scale * (e_c - e_uc)

    if getattr(model, "parameterization", "eps") == "eps":  # any object with apply_model predicts eps
        return output_fn
    return lambda x, t: model.predict_eps_from_z_and_v(x, t, output_fn(x, t))


def _cat(uc, c):
    """The batch [uc; c] of two conditionings: tensors, or dicts of tensors (SDXL)."""
    if isinstance(c, dict):
        return {k: torch.cat([uc[k], c[k]]) for k in c}
    return torch.cat([uc, c])


def _ddim_update(x, e, a, a_prev, sigma, generator=None):
    """One DDIM step at scalars a = alpha_cumprod_t, a_prev -> (x_prev, pred_x0)."""
    pred_x0 = (x - (1 - a) ** 0.5 * e) / a ** 0.5
    x_prev = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * e
    if sigma > 0:
        x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x_prev, pred_x0


def _steps(sched):
    """Yield (i, t, a, a_prev, sigma) from the last timestep to the first, as Python floats."""
    for i in reversed(range(len(sched["timesteps"]))):
        yield (i, int(sched["timesteps"][i]), float(sched["a"][i]), float(sched["a_prev"][i]),
               float(sched["sigma"][i]))


@torch.no_grad()
def sample_ddim(eps_fn, x, sched, callback=None, generator=None):
    """x: x_T (B, C, h, w) -> x_0. callback(step, x, pred_x0) after every step."""
    for k, (i, t, a, a_prev, sigma) in enumerate(_steps(sched)):
        e = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x, pred_x0 = _ddim_update(x, e, a, a_prev, sigma, generator)
        if callback is not None:
            callback(k, x, pred_x0)
    return x


@torch.no_grad()
def sample_plms(eps_fn, x, sched, callback=None, generator=None):
    """Pseudo linear multistep (PNDM) of the reference: improved Euler first, then Adams-Bashforth 2-4."""
    old_eps, steps = [], list(_steps(sched))
    for k, (i, t, a, a_prev, _) in enumerate(steps):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        e = eps_fn(x, tt)
        if not old_eps:
            x_next, _ = _ddim_update(x, e, a, a_prev, 0.0)
            t_next = steps[k + 1][1] if k + 1 < len(steps) else t
            e_prime = (e + eps_fn(x_next, torch.full_like(tt, t_next))) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = _ddim_update(x, e_prime, a, a_prev, 0.0)
        old_eps = (old_eps + [e])[-3:]
        if callback is not None:
            callback(k, x, pred_x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(eps_fn, x, sched, callback=None, generator=None):
    """DPM-Solver++(2M) (Lu et al., 2022) in data-prediction form, on the schedule's timesteps (log-SNR spacing
    by default: DEFAULT_SPACING).

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma) and h = lambda_prev - lambda:
    x_prev = (sigma_prev / sigma) x - alpha_prev (exp(-h) - 1) D, where D is the denoised estimate,
    extrapolated from the previous step's estimate after the first step (second order).
    """
    old_x0, h_last = None, None
    for k, (i, t, a, a_prev, _) in enumerate(_steps(sched)):
        e = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        alpha, sigma, alpha_p, sigma_p = a ** 0.5, (1 - a) ** 0.5, a_prev ** 0.5, (1 - a_prev) ** 0.5
        pred_x0 = (x - sigma * e) / alpha
        h = math.log(alpha_p / sigma_p) - math.log(alpha / sigma)
        d = pred_x0
        if old_x0 is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * pred_x0 - (1 / (2 * r)) * old_x0
        x = (sigma_p / sigma) * x - alpha_p * math.expm1(-h) * d
        old_x0, h_last = pred_x0, h
        if callback is not None:
            callback(k, x, pred_x0)
    return x


SAMPLERS = {"ddim": sample_ddim, "plms": sample_plms, "dpmpp_2m": sample_dpmpp_2m, "euler": sample_euler,
            "dpmpp_2m_sigma": sample_dpmpp_2m_sigma}
DEFAULT_SPACING = {"ddim": "uniform", "plms": "uniform", "dpmpp_2m": "logsnr", "euler": "legacy",
                   "dpmpp_2m_sigma": "legacy"}
SIGMA_ZERO_SAMPLERS = ("euler", "dpmpp_2m_sigma")  # sgm's: the last step goes to sigma 0 (x_0), not to t = 0


@torch.no_grad()
def sample_latents(model, captions, shape, steps=50, scale=1.0, eta=0.0, sampler="ddim", x_T=None,
                   generator=None, callback=None, spacing=None):
    """Text -> scaled latents (B, C, h, w) with a LatentDiffusion model. uc is the empty prompt (SDXL: the model's
    `unconditional_conditioning`); spacing: the timestep grid (default: the sampler's, DEFAULT_SPACING)."""
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"{sampler} is deterministic here: use --ddim_eta 0 with it")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}' (use one of {', '.join(SAMPLERS)})")
    edges, texts = prompt_schedule(captions, model.num_timesteps, steps)
    if getattr(model, "conditions_on_size", False):  # SDXL: the vector conditioning holds the image size
        c = [model.banded_conditioning(seg, latent_size=shape[-2:]) for seg in texts]
        uc = model.unconditional_conditioning(len(captions), latent_size=shape[-2:]) if scale != 1.0 else None
    else:
        c = [model.banded_conditioning(seg) for seg in texts]
        uc = model.get_learned_conditioning([""] * len(captions)) if scale != 1.0 else None
    like = c[0][0]["crossattn"] if isinstance(c[0][0], dict) else c[0][0]
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
    sched = ddim_schedule(model.alphas_cumprod, steps, eta, spacing or DEFAULT_SPACING[sampler])
    eps_fn = guided_eps(model, c if edges else c[0], uc, scale, edges)
    return SAMPLERS[sampler](eps_fn, x_T.to(like.device), sched, callback, generator)
