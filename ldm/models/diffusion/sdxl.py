"""SDXL base as a LatentDiffusion: eps-prediction UNet with vector conditioning, SDXL's two text encoders and size
embeddings (`ldm.modules.encoders.conditioner`), scale factor 0.13025, the DDPM schedule 0.00085-0.012
("scaled_linear": linear in sqrt(beta)).

State-dict keys are those of `sd_xl_base_1.0.safetensors` (sgm's DiffusionEngine): `model.diffusion_model.*`,
`conditioner.embedders.N.*`, `first_stage_model.*`. The text encoders live in `cond_stage_model` as in every model
of the framework, so textual inversion, training and sampling run unchanged; only the state dict names the module
`conditioner`. The DDPM schedule buffers are not saved (sgm's files have none); a file's `denoiser.sigmas` and CLIP-L
`position_ids` are checked against the computed values and dropped, and need not be present.
"""
import contextlib

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS, make_beta_schedule
from ldm.models.diffusion.sigma_sampling import DiscreteDenoiser
from ldm.modules.diffusionmodules.util import keeping_saved
from ldm.modules.encoders.conditioner import SIZE_KEYS, TEXT_KEY

OURS, RELEASE = "cond_stage_model.", "conditioner."
PLAIN_MANAGER = "ldm.modules.embedding_manager.EmbeddingManager"
XL_MANAGER = "ldm.modules.embedding_manager_xl.SDXLEmbeddingManager"


class SDXLDiffusion(LatentDiffusion):
    """conditioner_config: the GeneralConditioner node (sgm's); the rest as LatentDiffusion (eps only).

    Conditioning is a dict {"crossattn": (B, 77, 2048), "vector": (B, 2816)}; captions alone are conditioned on the
    image size itself (original = target = the image's size, crop (0, 0)), as SDXL is used for square 1024 px
    images; a batch may give `original_size_as_tuple`, `crop_coords_top_left`, `target_size_as_tuple` instead.
    """

    conditions_on_size = True
    timestep_bands_ok = False

    def __init__(self, unet_config, first_stage_config, conditioner_config, personalization_config=None,
                 scale_factor=0.13025, linear_start=0.00085, linear_end=0.012, timesteps=1000, **options):
        if options.get("parameterization", "eps") != "eps" or options.get("beta_schedule", "linear") != "linear":
            raise ValueError("SDXL base predicts eps on the linear-in-sqrt schedule: drop parameterization and "
                             "beta_schedule")
        if options.get("train_guidance_scale", 1.0) != 1.0:
            raise ValueError("train_guidance_scale is not supported for SDXL (its unconditional context depends on "
                             "the size conditioning): drop it")
        ckpt_path = options.pop("ckpt_path", None)
        super().__init__(unet_config, first_stage_config, conditioner_config, personalization_config,
                         timesteps=timesteps, linear_start=linear_start, linear_end=linear_end,
                         scale_factor=scale_factor, **options)
        self._non_persistent_buffers_set.update(SCHEDULE_BUFFERS)
        betas = make_beta_schedule("linear", timesteps, linear_start, linear_end)  # float64, as sgm's sigmas
        self.denoiser = DiscreteDenoiser(torch.cumprod(1 - betas, dim=0))
        self.register_state_dict_post_hook(_release_names)
        self.register_load_state_dict_pre_hook(_our_names)
        if ckpt_path is not None:  # after the hooks: the file is in the release layout
            from ldm.checkpoints import load_state_dict_into
            load_state_dict_into(self, ckpt_path, ignore_prefixes=options.get("ignore_keys", ()))

    def build_embedding_manager(self):
        """One EmbeddingManager per text encoder in an SDXLEmbeddingManager; a plain EmbeddingManager node (e.g.
        txt2img's default for --embedding_path) is read as the SDXL one with the same options."""
        from ldm.util import instantiate_from_config

        if self.personalization_config is None:
            return None
        node = dict(self.personalization_config)
        if node.get("target") == PLAIN_MANAGER:
            node["target"] = XL_MANAGER
        return instantiate_from_config(node, embedder=self.cond_stage_model)

    @property
    def first_stage_factor(self):
        """Pixels per latent pixel: 2 ** (number of resolutions of the autoencoder - 1)."""
        return 2 ** (len(self.first_stage_model.encoder.down) - 1)

    # ---- conditioning ---------------------------------------------------------------------------
    def size_batch(self, n, latent_size=None):
        """-> the SIZE_KEYS entries for n images of latent size (h, w) (default: the model's image_size)."""
        h, w = latent_size if latent_size is not None else (self.image_size, self.image_size)
        f = self.first_stage_factor
        size = torch.tensor([[int(h) * f, int(w) * f]] * n)
        return {"original_size_as_tuple": size, "crop_coords_top_left": torch.zeros_like(size),
                "target_size_as_tuple": size}

    def get_learned_conditioning(self, c, band=0, latent_size=None, sizes=None):
        """c: B captions -> {"crossattn": (B, T, D), "vector": (B, V)}; sizes: SIZE_KEYS from a batch, else those of
        `size_batch(B, latent_size)`."""
        batch = {TEXT_KEY: list(c), **(sizes or self.size_batch(len(c), latent_size))}
        return self.cond_stage_model(batch, embedding_manager=self.embedding_manager, band=band)

    def banded_conditioning(self, captions, latent_size=None):
        return [self.get_learned_conditioning(captions, 0, latent_size)]

    def unconditional_conditioning(self, n, latent_size=None):
        """sgm's SDXL uc: text outputs zero (force_uc_zero_embeddings=["txt"]), size embeddings kept."""
        batch = {TEXT_KEY: [""] * n, **self.size_batch(n, latent_size)}
        return self.cond_stage_model(batch, zero_text=True)

    def apply_model(self, x_t, t, c):
        """x_t: (B, C, h, w), t: (B,) int64, c: {"crossattn", "vector"} -> eps (B, C, h, w)."""
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        compiled = self._compiled_model is not None and torch.is_grad_enabled()
        return (self._compiled_model if compiled else self.model)(x_t, t, c_crossattn=[c["crossattn"]], y=c["vector"])

    def shared_step(self, batch):
        """LatentDiffusion's step, conditioned on the batch's sizes (or the images' own)."""
        with contextlib.nullcontext() if self.recompute_projections else keeping_saved():
            z0 = self.latents_from_batch(batch)
            captions = self.captions_from_batch(batch)
            sizes = {k: batch[k] for k in SIZE_KEYS} if all(k in batch for k in SIZE_KEYS) else None
            t = self.draw_timesteps(z0.shape[0], z0.device)
            c = self.get_learned_conditioning(captions, 0, z0.shape[-2:], sizes)
            return self.add_embedding_regulariser(*self.p_losses(z0, c, t))


def _release_names(module, state_dict, prefix, local_metadata):
    """state_dict post-hook: `cond_stage_model.` keys renamed `conditioner.`, in sgm's order (UNet, conditioner, first
    stage, then anything else)."""
    items = [(prefix + RELEASE + k[len(prefix + OURS):] if k.startswith(prefix + OURS) else k, v)
             for k, v in state_dict.items()]
    order = [prefix + p for p in ("model.", RELEASE, "first_stage_model.")]
    rank = {k: next((i for i, p in enumerate(order) if k.startswith(p)), len(order)) for k, _ in items}
    state_dict.clear()
    state_dict.update(sorted(items, key=lambda kv: rank[kv[0]]))


def _our_names(module, state_dict, prefix, *args):
    """load pre-hook: release `conditioner.` keys renamed `cond_stage_model.`."""
    for key in [k for k in state_dict if k.startswith(prefix + RELEASE)]:
        state_dict[prefix + OURS + key[len(prefix + RELEASE):]] = state_dict.pop(key)
