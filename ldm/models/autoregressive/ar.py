"""ARTextToImage: an autoregressive text-to-image model over the codes of a frozen VQ first stage.

    image (B, 3, H, W) --VQ encoder + quantizer--> codes (B, h*w) raster order
    caption --text encoder (T5)--> context (B, T, D);   loss = cross-entropy(transformer(codes[:, :-1], context), codes)

NextScaleTextToImage is the same model over a pyramid of token maps (MultiScaleVQModel, NextScaleTransformer):
each scale is predicted from the text and the coarser scales.

Two ways to train, as for LatentDiffusion (the config decides):
- pretraining: transformer and text encoder train; with probability cond_drop_prob a sample's context
  is replaced by the learned unconditional context `null_context` (for classifier-free guidance);
- textual inversion (`personalization_config`): transformer, first stage and text encoder frozen and in
  eval mode, no condition dropout; only the EmbeddingManager's vectors train.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder import images_from_batch
from ldm.models.autoregressive.sampling import sample_codes, sample_scales
from ldm.models.textual_inversion import TextConditionedModel, freeze
from ldm.util import instantiate_from_config


class ARTextToImage(TextConditionedModel):
    generator_parts = ("transformer",)

    def __init__(self, transformer_config, first_stage_config, cond_stage_config, personalization_config=None,
                 image_size=8, context_dim=64, first_stage_key="image", cond_stage_key="caption",
                 cond_stage_trainable=False, cond_drop_prob=0.0, embedding_reg_weight=0.0, train_embedding=True,
                 trainable_modules=None, ckpt_path=None, init_ckpt=None, embedding_ema=0.0):
        super().__init__()
        self.image_size = image_size  # codes per side
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.cond_drop_prob, self.embedding_reg_weight = cond_drop_prob, embedding_reg_weight
        self.transformer = instantiate_from_config(transformer_config)
        self.null_context = nn.Parameter(torch.randn(1, 1, context_dim) * 0.02)
        self.first_stage_model = freeze(instantiate_from_config(first_stage_config))
        self.setup_conditioning(cond_stage_config, personalization_config, cond_stage_trainable, train_embedding,
                                trainable_modules, embedding_ema)
        if personalization_config is not None:
            self.null_context.requires_grad_(False)
        from ldm.checkpoints import load_state_dict_into, warm_start
        if init_ckpt is not None:  # pretraining from a related model's generator and text encoder
            warm_start(self, init_ckpt, skip=("first_stage_model.",))
        if ckpt_path is not None:
            load_state_dict_into(self, ckpt_path)

    # ---- first stage ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_codes(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> codes (B, h*w) int64, raster order."""
        _, _, indices = self.first_stage_model.quantize_latents(self.first_stage_model.encode(x))
        return indices.flatten(1)

    @torch.no_grad()
    def decode_codes(self, codes):
        """codes: (B, h*w) -> images (B, 3, H, W), roughly in [-1, 1]."""
        return self.first_stage_model.decode_indices(codes.view(-1, self.image_size, self.image_size))

    def code_logits(self, codes, c):
        """codes: (B, N), c: (B, T, D) -> (B, N, K) logits of every code given the ones before it (teacher forcing)."""
        return self.transformer(codes[:, :-1], c)

    def generate_codes(self, c, **kwargs):
        """c: (B, T, D) -> codes (B, N) drawn one at a time (kwargs: sample_codes' options)."""
        return sample_codes(self.transformer, c, self.null_context, **kwargs)

    @property
    def sampling_steps(self):
        """Transformer steps of one sample (callback calls of sample_images)."""
        return self.transformer.n_positions

    # ---- training -------------------------------------------------------------------------------
    def context_with_dropout(self, c):
        """While pretraining, each sample's context becomes null_context with probability cond_drop_prob."""
        if not (self.training and self.embedding_manager is None and self.cond_drop_prob > 0):
            return c
        drop = torch.rand(c.shape[0], 1, 1, device=c.device) < self.cond_drop_prob
        return torch.where(drop, self.null_context.expand_as(c), c)

    def shared_step(self, batch):
        codes = self.encode_codes(images_from_batch(batch, self.first_stage_key))
        c = self.context_with_dropout(self.get_learned_conditioning(list(batch[self.cond_stage_key])))
        logits = self.code_logits(codes, c)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten(), reduction="none").view(codes.shape)
        loss = self.code_loss(ce)
        return self.add_embedding_regulariser(loss, {"loss_ce": loss.detach()})

    def code_loss(self, ce):
        """ce: (B, N) cross-entropy of every code -> the loss (mean over codes)."""
        return ce.mean()

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, captions, steps=None, scale=3.0, generator=None):
        """captions: list of B str -> images (B, 3, H, W) in [-1, 1] (steps: unused, codes are drawn one by one)."""
        return self.sample_images(captions, scale=scale, generator=generator)

    @torch.no_grad()
    def sample_images(self, captions, scale=3.0, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                      callback=None):
        """captions: list of B str -> images (B, 3, H, W) in [-1, 1]; callback(i) after each of sampling_steps."""
        c = self.get_learned_conditioning(captions)
        codes = self.generate_codes(c, scale=scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator, callback=callback)
        return self.decode_codes(codes).clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch, N=8, guidance_scale=3.0, top_k=0, top_p=1.0, **kwargs):
        """-> dict of (N, 3, H, W) images in [-1, 1]: inputs, reconstruction, samples, samples_scaled."""
        x = images_from_batch(batch, self.first_stage_key)[:N].to(self.device)
        captions = list(batch[self.cond_stage_key])[:N]
        logs = {"inputs": x, "reconstruction": self.decode_codes(self.encode_codes(x))}
        for key, scale in (("samples", 1.0), (f"samples_scaled_{guidance_scale:g}", guidance_scale)):
            logs[key] = self.sample_images(captions, scale=scale, top_k=top_k, top_p=top_p)
        return {k: v.clamp(-1, 1) for k, v in logs.items()}


class NextScaleTextToImage(ARTextToImage):
    """Next-scale (VAR-style) text-to-image: a MultiScaleVQModel first stage and a NextScaleTransformer.

    Codes are every scale's token map flattened, coarsest first; the loss is their cross-entropy, averaged over all
    codes (VAR's way: the 8x8 map is 64 of 85 codes) or, with `balance_scales`, over each scale and then over the
    scales, so the one code of the 1x1 map, which decides the image's overall look (its background), weighs as
    much as the finest map: a TI setting (configs/ar-shapes/finetune-scales.yaml).
    """

    def __init__(self, *args, balance_scales=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.balance_scales = balance_scales
        check_scales(self.transformer.scales, self.first_stage_model.quantize.scales, self.image_size)

    def code_loss(self, ce):
        if not self.balance_scales:
            return super().code_loss(ce)
        sizes = self.first_stage_model.quantize.codes_per_scale()
        return torch.stack([part.mean() for part in ce.split(sizes, dim=1)]).mean()

    @torch.no_grad()
    def encode_codes(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> codes (B, N) int64, N = sum of the scales' areas."""
        return self.first_stage_model.encode_codes(x)

    @torch.no_grad()
    def decode_codes(self, codes):
        return self.first_stage_model.decode_codes(codes)

    def code_logits(self, codes, c):
        quantizer = self.first_stage_model.quantize
        return self.transformer(quantizer.next_scale_inputs(quantizer.split(codes)), c)

    def generate_codes(self, c, **kwargs):
        return sample_scales(self.transformer, self.first_stage_model.quantize, c, self.null_context, **kwargs)

    @property
    def sampling_steps(self):
        return len(self.transformer.scales)


def check_scales(transformer_scales, quantizer_scales, image_size):
    """The transformer predicts the quantiser's token maps, and image_size (codes per side) is the finest one."""
    if tuple(transformer_scales) != tuple(quantizer_scales):
        raise ValueError(f"transformer scales {list(transformer_scales)} differ from the first stage's "
                         f"{list(quantizer_scales)}: give transformer_config and first_stage_config the same scales")
    if image_size != quantizer_scales[-1]:
        raise ValueError(f"image_size={image_size} is not the finest scale {quantizer_scales[-1]}: set "
                         f"model.params.image_size to {quantizer_scales[-1]}")
