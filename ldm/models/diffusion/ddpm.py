"""LatentDiffusion: DDPM in the latent space of a frozen first stage, text-conditioned; the UNet predicts eps
(LDM, SD v1) or v (`parameterization: v`, SD 2.x 768-v).

Two ways to train, chosen by the config:
- textual inversion (`personalization_config` given): UNet, first stage and text encoder frozen;
  only the EmbeddingManager's vectors train;
- pretraining (no personalization, `cond_stage_trainable: true`): UNet and text encoder train.
State-dict keys match latent-diffusion's (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`, the twelve schedule buffers), so its checkpoints load strictly.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder import images_from_batch
from ldm.models.diffusion.latent_cache import LatentCache
from ldm.models.diffusion.schedule import NoiseSchedule
from ldm.models.textual_inversion import TextConditionedModel, check_lr_decay, freeze
from ldm.modules.diffusionmodules.util import keeping_saved
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class DiffusionWrapper(nn.Module):
    """Holds the UNet under the name `diffusion_model` and feeds it cross-attention context."""

    def __init__(self, unet_config, conditioning_key="crossattn"):
        super().__init__()
        if conditioning_key != "crossattn":
            raise NotImplementedError(f"conditioning_key '{conditioning_key}' is not supported (use crossattn)")
        self.diffusion_model = instantiate_from_config(unet_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_crossattn, y=None):
        """y: (B, adm_in_channels) vector conditioning, for a UNet with label_emb (SDXL)."""
        context = c_crossattn[0] if len(c_crossattn) == 1 else torch.cat(c_crossattn, dim=1)
        if y is None:
            return self.diffusion_model(x, t, context=context)
        return self.diffusion_model(x, t, context=context, y=y)


def _compiled(forward, backend):
    """torch.compile of the training step's UNet call (`backend`: True for inductor, or a backend's name such as
    "aot_eager"); None when off. Sampling runs the UNet eagerly: its batches (guidance pairs, logged grids) have
    other shapes, each of which would compile again."""
    if not backend:
        return None
    return torch.compile(forward, backend="inductor" if backend is True else str(backend))


class LatentDiffusion(NoiseSchedule, TextConditionedModel):
    generator_parts = ("model",)
    timestep_bands_ok = True

    def __init__(self, unet_config, first_stage_config, cond_stage_config, personalization_config=None,
                 timesteps=1000, beta_schedule="linear", linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3,
                 given_betas=None, scale_factor=1.0, image_size=32, channels=4, first_stage_key="image",
                 cond_stage_key="caption", conditioning_key="crossattn", cond_stage_trainable=False,
                 embedding_reg_weight=0.0, cond_drop_prob=0.0, latent_cache=False, channels_last=False,
                 recompute_projections=True, compile=False, ckpt_path=None, ignore_keys=(), train_embedding=True,
                 trainable_modules=None, train_timesteps=None, train_timesteps_p=1.0, band_overlap=0,
                 train_guidance_scale=1.0, lr_decay="none", parameterization="eps", embedding_ema=0.0,
                 **reference_options):
        super().__init__()
        self.reference = _ReferenceOptions(**reference_options)
        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s, given_betas,
                               self.reference.v_posterior, parameterization)
        self.logvar = torch.full((self.num_timesteps,), float(self.reference.logvar_init))
        self.image_size, self.channels = image_size, channels
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.scale_factor = scale_factor
        self.embedding_reg_weight, self.cond_drop_prob = embedding_reg_weight, cond_drop_prob
        self.train_timesteps = _timestep_range(train_timesteps, self.num_timesteps)
        if not 0.0 <= train_timesteps_p <= 1.0:
            raise ValueError(f"train_timesteps_p={train_timesteps_p} is not a probability: use a value in [0, 1]")
        self.train_timesteps_p = float(train_timesteps_p)
        self.band_overlap = _band_overlap(band_overlap, self.num_timesteps)
        self.train_guidance_scale = _guidance_scale(train_guidance_scale)
        self.lr_decay = check_lr_decay(lr_decay)
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = freeze(instantiate_from_config(first_stage_config))
        self.setup_conditioning(cond_stage_config, personalization_config, cond_stage_trainable, train_embedding,
                                trainable_modules, embedding_ema)
        self.latent_cache = LatentCache(self.first_stage_model) if latent_cache else None
        if ckpt_path is not None:
            from ldm.checkpoints import load_state_dict_into
            load_state_dict_into(self, ckpt_path, ignore_prefixes=ignore_keys)
        self.channels_last, self.recompute_projections = channels_last, recompute_projections
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._compiled_model = _compiled(self.model.forward, compile)

    # ---- first stage and conditioning ------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, generator=None):
        if isinstance(posterior, DiagonalGaussianDistribution):
            z = posterior.sample(generator)
        else:
            z = posterior
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z):
        """z: (B, C, h, w) scaled latents -> images (B, 3, H, W), roughly in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_t, t, c):
        """x_t: (B, C, h, w), t: (B,) int64, c: (B, T, D) -> the UNet's output (B, C, h, w): eps, or v for
        parameterization v (the samplers convert it: `guided_eps`)."""
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        compiled = self._compiled_model is not None and torch.is_grad_enabled()
        return (self._compiled_model if compiled else self.model)(x_t, t, c_crossattn=[c])

    # ---- training ---------------------------------------------------------------------------------
    def latents_from_batch(self, batch):
        """-> z0: (B, C, h, w) scaled latents, drawn from the (possibly cached) first-stage posterior."""
        x = images_from_batch(batch, self.first_stage_key)
        if self.latent_cache is not None:
            keys = batch.get(f"{self.first_stage_key}_key")  # the dataset's names of the images' content
            posterior = self.latent_cache.posterior(x, self.encode_first_stage, keys)
        else:
            posterior = self.encode_first_stage(x)
        return self.get_first_stage_encoding(posterior).detach()

    def p_losses(self, z0, c, t, noise=None, uc=None):
        """The simple MSE loss of the reference against noise (eps) or get_v (v), logvar fixed at 0, plus the
        optional vlb term.

        uc: (B, T, D) context of the empty prompt, or None. With it the loss is on the guided output
        o_uc + w (o_c - o_uc), w = train_guidance_scale, o_uc without gradient (an ablation: what sampling at w
        draws is what is fitted)."""
        noise = torch.randn_like(z0) if noise is None else noise
        x_t = self.q_sample(z0, t, noise)
        out = self.apply_model(x_t, t, c)
        if uc is not None:
            with torch.no_grad():
                out_uc = self.apply_model(x_t, t, uc)
            out = out_uc + self.train_guidance_scale * (out - out_uc)
        target = self.training_target(z0, noise, t)
        loss_simple = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        logvar_t = self.logvar.to(z0.device)[t]
        loss = (loss_simple / torch.exp(logvar_t) + logvar_t).mean() * self.reference.l_simple_weight
        logs = {"loss_simple": loss_simple.mean().detach()}
        if self.reference.original_elbo_weight > 0:
            loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
            loss = loss + self.reference.original_elbo_weight * loss_vlb
            logs["loss_vlb"] = loss_vlb.detach()
        return loss, logs

    def shared_step(self, batch):
        """recompute_projections: autograd keeps the inputs of the wide projections (the text encoder's queries, keys,
        values and feed-forward, the UNet's keys and values of the context and GEGLU) and backward projects again
        (`recompute_saved`: the same values, less memory, a little more time); off: it keeps the projections."""
        with contextlib.nullcontext() if self.recompute_projections else keeping_saved():
            z0 = self.latents_from_batch(batch)
            captions = self.captions_from_batch(batch)
            t = self.draw_timesteps(z0.shape[0], z0.device)
            c = self.conditioning_by_band(captions, self.timestep_band(self.jitter_for_bands(t)))
            return self.add_embedding_regulariser(*self.p_losses(z0, c, t, uc=self.training_uc(len(captions))))

    def training_uc(self, n):
        """-> (n, T, D) context of the empty prompt when the loss is on the guided output (train_guidance_scale
        != 1), else None."""
        if self.train_guidance_scale == 1.0:
            return None
        with torch.no_grad():
            return self.get_learned_conditioning([""] * n)

    def jitter_for_bands(self, t):
        """t: (B,) int64 -> (B,) int64, t moved by +band_overlap or -band_overlap at random (training only).

        The band of the moved t picks the vectors a training sample conditions on (the loss stays at t): a t within
        band_overlap of an edge trains either neighbouring set, 50/50, so both learn from that zone, while sampling
        keeps hard edges. E.g. edges [600] with band_overlap 200: [0, 400) trains the low set, [800, 1000) the
        high one, [400, 800) both.
        """
        if not self.band_overlap:
            return t
        sign = torch.randint(0, 2, t.shape, device=t.device) * 2 - 1
        return (t + sign * self.band_overlap).clamp(0, self.num_timesteps - 1)

    def timestep_band(self, t):
        """t: (B,) int64 -> (B,) int64, the embedding manager's timestep band of each t (0 without bands)."""
        edges = self.embedding_manager.timestep_bands if self.embedding_manager is not None else ()
        if edges and edges[-1] >= self.num_timesteps:
            raise ValueError(f"timestep_bands={list(edges)} reach past this model's {self.num_timesteps} timesteps: "
                             f"keep every edge below {self.num_timesteps}")
        return torch.bucketize(t, torch.tensor(edges, dtype=t.dtype, device=t.device), right=True)

    def draw_timesteps(self, n, device):
        """-> t: (n,) int64; each from `train_timesteps` with probability train_timesteps_p, else from all of them."""
        t = torch.randint(*self.train_timesteps, (n,), device=device)
        if self.train_timesteps_p < 1.0:
            anywhere = torch.rand(n, device=device) >= self.train_timesteps_p
            t = torch.where(anywhere, torch.randint(0, self.num_timesteps, (n,), device=device), t)
        return t

    # ---- image logs -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, captions, steps=50, scale=5.0, generator=None):
        """captions: list of B str -> images (B, 3, H, W) in [-1, 1] at the model's size (DDIM, eta 0)."""
        from ldm.models.diffusion.sampling import sample_latents

        shape = (len(captions), self.channels, self.image_size, self.image_size)
        z = sample_latents(self, captions, shape, steps=steps, scale=scale, generator=generator)
        return self.decode_first_stage(z).clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch, N=8, ddim_steps=50, ddim_eta=0.0, guidance_scale=5.0, **kwargs):
        """-> dict of (N, 3, H, W) images in [-1, 1]: inputs, reconstruction, samples, samples_scaled."""
        from ldm.models.diffusion.sampling import sample_latents

        x = images_from_batch(batch, self.first_stage_key)[:N].to(self.device)
        captions = list(batch[self.cond_stage_key])[:N]
        z = self.get_first_stage_encoding(self.encode_first_stage(x))
        logs = {"inputs": x, "reconstruction": self.decode_first_stage(z)}
        shape = (len(captions), self.channels, self.image_size, self.image_size)
        for key, scale in (("samples", 1.0), (f"samples_scaled_{guidance_scale:g}", guidance_scale)):
            zs = sample_latents(self, captions, shape, steps=ddim_steps, scale=scale, eta=ddim_eta)
            logs[key] = self.decode_first_stage(zs)
        return {k: v.clamp(-1, 1) for k, v in logs.items()}


def _timestep_range(value, num_timesteps):
    """[lo, hi) of the training timesteps, drawn uniformly; None: all of [0, num_timesteps)."""
    if value is None:
        return 0, num_timesteps
    lo, hi = (int(v) for v in value)
    if not 0 <= lo < hi <= num_timesteps:
        raise ValueError(f"train_timesteps={list(value)} is not a range inside [0, {num_timesteps}): "
                         f"give [lo, hi] with 0 <= lo < hi <= {num_timesteps}")
    return lo, hi


def _guidance_scale(value):
    """The guidance of the training loss: 1 (the plain conditional output, the reference's) or more."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1.0:
        raise ValueError(f"train_guidance_scale={value!r} is not a guidance scale: use 1 (the reference's loss) or "
                         "the scale you sample at, e.g. 3.0")
    return float(value)


def _band_overlap(value, num_timesteps):
    """How far past its edges each timestep band's vectors train: 0 (hard edges) up to num_timesteps - 1."""
    if not 0 <= int(value) < num_timesteps:
        raise ValueError(f"band_overlap={value} is not a timestep count: use 0 (hard band edges) or a "
                         f"value below {num_timesteps}, e.g. 150")
    return int(value)


class _ReferenceOptions:
    """Options of the reference constructor that only matter for its bookkeeping or stay at defaults."""

    _BOOKKEEPING = ("num_timesteps_cond", "log_every_t", "monitor", "clip_denoised", "concat_mode")
    _DEFAULTS = {"use_ema": False, "cond_stage_forward": None, "scale_by_std": False, "loss_type": "l2",
                 "use_positional_encodings": False, "learn_logvar": False, "load_only_unet": False,
                 "scheduler_config": None}

    def __init__(self, v_posterior=0.0, logvar_init=0.0, l_simple_weight=1.0, original_elbo_weight=0.0, **others):
        self.v_posterior, self.logvar_init = v_posterior, logvar_init
        self.l_simple_weight, self.original_elbo_weight = l_simple_weight, original_elbo_weight
        bad = {k: v for k, v in others.items()
               if k not in self._BOOKKEEPING and (k not in self._DEFAULTS or self._DEFAULTS[k] != v)}
        if bad:
            raise NotImplementedError(f"LatentDiffusion options not supported by this framework: {bad}")
