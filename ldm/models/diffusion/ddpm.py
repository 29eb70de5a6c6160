"""LatentDiffusion: eps-prediction DDPM in the latent space of a frozen first stage, text-conditioned.

Two ways to train, chosen by the config:
- textual inversion (`personalization_config` given): UNet, first stage and text encoder frozen;
  only the EmbeddingManager's vectors train;
- pretraining (no personalization, `cond_stage_trainable: true`): UNet and text encoder train.
State-dict keys match latent-diffusion's (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`, the twelve schedule buffers), so its checkpoints load strictly.
"""
import random

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder import images_from_batch
from ldm.models.diffusion.latent_cache import LatentCache
from ldm.models.diffusion.schedule import NoiseSchedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import exists, instantiate_from_config


class DiffusionWrapper(nn.Module):
    """Holds the UNet under the name `diffusion_model` and feeds it cross-attention context."""

    def __init__(self, unet_config, conditioning_key="crossattn"):
        super().__init__()
        if conditioning_key != "crossattn":
            raise NotImplementedError(f"conditioning_key '{conditioning_key}' is not supported (use crossattn)")
        self.diffusion_model = instantiate_from_config(unet_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_crossattn):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, dim=1))


def freeze(module):
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class LatentDiffusion(NoiseSchedule, pl.LightningModule):
    def __init__(self, unet_config, first_stage_config, cond_stage_config, personalization_config=None,
                 timesteps=1000, beta_schedule="linear", linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3,
                 given_betas=None, scale_factor=1.0, image_size=32, channels=4, first_stage_key="image",
                 cond_stage_key="caption", conditioning_key="crossattn", cond_stage_trainable=False,
                 embedding_reg_weight=0.0, cond_drop_prob=0.0, latent_cache=False, channels_last=False,
                 compile=False, ckpt_path=None, ignore_keys=(), train_embedding=True, trainable_modules=None,
                 **reference_options):
        super().__init__()
        self.reference = _ReferenceOptions(**reference_options)
        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s, given_betas,
                               self.reference.v_posterior)
        self.logvar = torch.full((self.num_timesteps,), float(self.reference.logvar_init))
        self.image_size, self.channels = image_size, channels
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.scale_factor = scale_factor
        self.embedding_reg_weight, self.cond_drop_prob = embedding_reg_weight, cond_drop_prob
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = freeze(instantiate_from_config(first_stage_config))
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.personalization_config = personalization_config
        self.embedding_manager = self.build_embedding_manager()
        if personalization_config is not None:
            freeze(self.model), freeze(self.cond_stage_model)
        elif not cond_stage_trainable:
            freeze(self.cond_stage_model)
        self.train_embedding = train_embedding
        self.trainable_modules = dict(trainable_modules or {})  # submodule path -> learning rate (None: base)
        self.unfreeze_trainable_modules()
        self.latent_cache = LatentCache() if latent_cache else None
        if ckpt_path is not None:
            from load import load_state_dict_into
            load_state_dict_into(self, ckpt_path, ignore_prefixes=ignore_keys)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.diffusion_model.compile()  # in place: state-dict keys stay the same

    def build_embedding_manager(self):
        """The EmbeddingManager of the config, its vectors initialised from the current text encoder."""
        if self.personalization_config is None:
            return None
        return instantiate_from_config(self.personalization_config, embedder=self.cond_stage_model)

    def on_weights_loaded(self, loaded_keys):
        """Called by `load.load_state_dict_into`. Initial vectors come from the text encoder's weights, so after
        loading a base checkpoint (one without learned vectors) the manager is built again from them."""
        if self.embedding_manager is not None and not any(k.startswith("embedding_manager.") for k in loaded_keys):
            device = next(self.cond_stage_model.parameters()).device
            self.embedding_manager = self.build_embedding_manager().to(device)
            self.unfreeze_trainable_modules()

    # ---- freezing ---------------------------------------------------------------------------
    @property
    def new_parameter_prefixes(self):
        """State-dict prefixes a base checkpoint lacks: the learned vectors, and new conditioner modules."""
        extra = getattr(self.cond_stage_model, "new_parameter_prefixes", ())
        return ("embedding_manager.",) + tuple(f"cond_stage_model.{p}" for p in extra)

    def unfreeze_trainable_modules(self):
        """In TI mode, `trainable_modules` train beside (or, without train_embedding, instead of) the vectors."""
        if self.embedding_manager is None:
            if self.trainable_modules or not self.train_embedding:
                raise ValueError("trainable_modules and train_embedding apply to textual inversion: "
                                 "add a personalization_config")
            return
        for path in self.trainable_modules:
            self.get_submodule(path).requires_grad_(True)
        for p in self.embedding_manager.embedding_parameters():
            p.requires_grad_(self.train_embedding)
        if not self.trainable_parameters():
            raise ValueError("nothing to train: set train_embedding true or list trainable_modules")

    def frozen_modules(self):
        return [m for m in (self.model, self.first_stage_model, self.cond_stage_model)
                if not any(p.requires_grad for p in m.parameters())]

    def train(self, mode=True):
        """Frozen parts stay in eval mode whatever Lightning asks (dropout off, as at inference);
        of a partly trained part only its `trainable_modules` follow `mode`."""
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        for path in self.trainable_modules:
            self.get_submodule(path.split(".")[0]).eval()
        for path in self.trainable_modules:
            self.get_submodule(path).train(mode)
        return self

    def param_groups(self, lr):
        """Optimizer groups: the vectors at `lr`, each trainable module at its own rate (or `lr`)."""
        if self.embedding_manager is None:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]
        vectors = list(self.embedding_manager.embedding_parameters())
        groups = [{"params": vectors, "lr": lr}] if self.train_embedding else []
        groups += [{"params": list(self.get_submodule(path).parameters()), "lr": lr if mlr is None else mlr}
                   for path, mlr in self.trainable_modules.items()]
        return groups

    def trainable_parameters(self):
        return [p for group in self.param_groups(0.0) for p in group["params"]]

    def trainable_module_state(self):
        """{full state-dict key: tensor} of the trainable modules (what a TI run saves beside its vectors)."""
        prefixes = tuple(f"{path}." for path in self.trainable_modules)
        return {k: v.detach() for k, v in self.state_dict().items() if k.startswith(prefixes)}

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

    def get_learned_conditioning(self, c):
        """c: list of B strings -> (B, T, D) cross-attention context (through the embedding manager)."""
        return self.cond_stage_model.encode(list(c), embedding_manager=self.embedding_manager)

    def apply_model(self, x_t, t, c):
        """x_t: (B, C, h, w), t: (B,) int64, c: (B, T, D) -> eps: (B, C, h, w)."""
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return self.model(x_t, t, c_crossattn=[c])

    # ---- training ---------------------------------------------------------------------------------
    def latents_from_batch(self, batch):
        """-> z0: (B, C, h, w) scaled latents, drawn from the (possibly cached) first-stage posterior."""
        x = images_from_batch(batch, self.first_stage_key)
        if self.latent_cache is not None:
            posterior = self.latent_cache.posterior(x, self.encode_first_stage)
        else:
            posterior = self.encode_first_stage(x)
        return self.get_first_stage_encoding(posterior).detach()

    def captions_from_batch(self, batch):
        captions = list(batch[self.cond_stage_key])
        if self.training and self.cond_drop_prob > 0:
            captions = ["" if random.random() < self.cond_drop_prob else c for c in captions]
        return captions

    def p_losses(self, z0, c, t, noise=None):
        """The simple eps-MSE loss of the reference (logvar fixed at 0), plus the optional vlb term."""
        noise = torch.randn_like(z0) if noise is None else noise
        eps = self.apply_model(self.q_sample(z0, t, noise), t, c)
        loss_simple = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        logvar_t = self.logvar.to(z0.device)[t]
        loss = (loss_simple / torch.exp(logvar_t) + logvar_t).mean() * self.reference.l_simple_weight
        logs = {"loss_simple": loss_simple.mean().detach()}
        if self.reference.original_elbo_weight > 0:
            loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
            loss = loss + self.reference.original_elbo_weight * loss_vlb
            logs["loss_vlb"] = loss_vlb.detach()
        return loss, logs

    def shared_step(self, batch):
        z0 = self.latents_from_batch(batch)
        c = self.get_learned_conditioning(self.captions_from_batch(batch))
        t = torch.randint(0, self.num_timesteps, (z0.shape[0],), device=z0.device)
        loss, logs = self.p_losses(z0, c, t)
        if self.embedding_manager is not None and self.embedding_reg_weight > 0:
            reg = self.embedding_manager.embedding_to_coarse_loss().mean()
            loss = loss + self.embedding_reg_weight * reg
            logs["loss_embedding_reg"] = reg.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def training_step(self, batch, batch_idx):
        loss, logs = self.shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch[self.cond_stage_key]))
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"}, on_step=True,
                      batch_size=len(batch[self.cond_stage_key]))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        _, logs = self.shared_step(batch)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True,
                      batch_size=len(batch[self.cond_stage_key]))

    def configure_optimizers(self):
        lr = getattr(self, "learning_rate", 1e-4)
        return torch.optim.AdamW(self.param_groups(lr), lr=lr)

    # ---- checkpoints: in TI mode only the trainable state is written ----------------------------
    def on_save_checkpoint(self, checkpoint):
        if self.embedding_manager is not None:
            keep = ("embedding_manager.",) + tuple(f"{path}." for path in self.trainable_modules)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(keep)}

    def on_load_checkpoint(self, checkpoint):
        if self.embedding_manager is not None:
            self.strict_loading = False

    # ---- image logs -----------------------------------------------------------------------------
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


class _ReferenceOptions:
    """Options of the reference constructor that only matter for its bookkeeping or stay at defaults."""

    _BOOKKEEPING = ("num_timesteps_cond", "log_every_t", "monitor", "clip_denoised", "concat_mode")
    _DEFAULTS = {"use_ema": False, "cond_stage_forward": None, "scale_by_std": False, "loss_type": "l2",
                 "parameterization": "eps", "use_positional_encodings": False, "learn_logvar": False,
                 "load_only_unet": False, "scheduler_config": None}

    def __init__(self, v_posterior=0.0, logvar_init=0.0, l_simple_weight=1.0, original_elbo_weight=0.0, **others):
        self.v_posterior, self.logvar_init = v_posterior, logvar_init
        self.l_simple_weight, self.original_elbo_weight = l_simple_weight, original_elbo_weight
        bad = {k: v for k, v in others.items()
               if k not in self._BOOKKEEPING and (k not in self._DEFAULTS or self._DEFAULTS[k] != v)}
        if bad:
            raise NotImplementedError(f"LatentDiffusion options not supported by this framework: {bad}")
