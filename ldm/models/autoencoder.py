"""First-stage autoencoders: AutoencoderKL (Gaussian latents) and VQModel (taming-transformers' quantizer).

Both are LightningModules so that our own tiny first stage is pretrained with the same machinery;
as the first stage of a LatentDiffusion model they are frozen and only `encode`/`decode` are used.
"""
import pytorch_lightning as pl
import torch
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


def images_from_batch(batch, key):
    """batch[key]: (B, H, W, C) in [-1, 1] (as datasets return it) -> (B, C, H, W) float, contiguous."""
    x = batch[key]
    if x.dim() == 3:
        x = x[..., None]
    return rearrange(x, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()


class _FirstStage(pl.LightningModule):
    """Shared training plumbing: reconstruction loss from `lossconfig`, Adam, image logs."""

    def __init__(self, lossconfig, image_key="image", monitor=None):
        super().__init__()
        self.image_key = image_key
        self.loss = instantiate_from_config(lossconfig)
        if monitor is not None:
            self.monitor = monitor

    def training_step(self, batch, batch_idx):
        loss, logs = self._step(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        return loss

    def validation_step(self, batch, batch_idx):
        loss, logs = self._step(batch)
        self.log("val/loss", loss, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True)

    def configure_optimizers(self):
        lr = getattr(self, "learning_rate", 4.5e-6)
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.9))

    @torch.no_grad()
    def log_images(self, batch, N=8, **kwargs):
        x = images_from_batch(batch, self.image_key)[:N].to(self.device)
        rec, _ = self(x)
        return {"inputs": x, "reconstructions": rec.clamp(-1, 1)}


class AutoencoderKL(_FirstStage):
    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 monitor=None, colorize_nlabels=None):
        super().__init__(lossconfig, image_key, monitor)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if ckpt_path is not None:
            from ldm.checkpoints import load_state_dict_into
            load_state_dict_into(self, ckpt_path, ignore_prefixes=ignore_keys)

    def encode(self, x):
        """x: (B, 3, H, W) -> posterior over z: (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _step(self, batch):
        x = images_from_batch(batch, self.image_key)
        rec, posterior = self(x)
        return self.loss(x, rec, posterior)


class VQModel(_FirstStage):
    """Vector-quantised autoencoder; `encode` returns pre-quantisation features, `decode` quantises first."""

    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 monitor=None, beta=0.25, remap=None, sane_index_shape=False, colorize_nlabels=None):
        super().__init__(lossconfig, image_key, monitor)
        from taming.modules.vqvae.quantize import VectorQuantizer2

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=beta, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if ckpt_path is not None:
            from ldm.checkpoints import load_state_dict_into
            load_state_dict_into(self, ckpt_path, ignore_prefixes=ignore_keys)

    def encode(self, x):
        """x: (B, 3, H, W) -> h: (B, embed_dim, h, w), before quantisation."""
        return self.quant_conv(self.encoder(x))

    def quantize_latents(self, h):
        """h: (B, D, h, w) -> (z_q, commitment loss, token indices (B, h, w))."""
        z_q, emb_loss, (_, _, indices) = self.quantize(h)
        return z_q, emb_loss, indices.reshape(h.shape[0], h.shape[2], h.shape[3])

    def decode(self, h, force_not_quantize=False):
        z_q = h if force_not_quantize else self.quantize_latents(h)[0]
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices):
        """indices: (B, h, w) int64 -> image (B, 3, H, W)."""
        B, h, w = indices.shape
        z_q = self.quantize.get_codebook_entry(indices.reshape(-1), (B, h, w, -1))
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x, sample_posterior=True):
        z_q, emb_loss, _ = self.quantize_latents(self.encode(x))
        return self.decoder(self.post_quant_conv(z_q)), emb_loss

    def _step(self, batch):
        x = images_from_batch(batch, self.image_key)
        rec, emb_loss = self(x)
        rec_loss = (x - rec).abs().mean()
        return rec_loss + emb_loss, {"rec_l1": rec_loss.detach(), "codebook": emb_loss.detach()}


VQModelInterface = VQModel


class MultiScaleVQModel(VQModel):
    """VQModel whose quantiser codes the features as a pyramid of residual scales (MultiScaleQuantizer):
    `encode_codes` gives the next-scale token maps, coarsest first, `decode_codes` the image.

    `init_ckpt` warm-starts encoder, decoder and codebook from a one-scale VQModel checkpoint (the scale
    convolutions start as the identity); `ckpt_path` loads a multi-scale one strictly.
    """

    def __init__(self, ddconfig, lossconfig, n_embed, embed_dim, scales=(1, 2, 4, 8), phi_ratio=0.5, init_ckpt=None,
                 ckpt_path=None, image_key="image", monitor=None, beta=0.25):
        super().__init__(ddconfig, lossconfig, n_embed, embed_dim, image_key=image_key, monitor=monitor, beta=beta)
        from ldm.modules.multiscale_quantize import MultiScaleQuantizer

        self.quantize = MultiScaleQuantizer(n_embed, embed_dim, scales, beta=beta, phi_ratio=phi_ratio)
        from ldm.checkpoints import load_state_dict_into, warm_start
        if init_ckpt is not None:
            warm_start(self, init_ckpt)
        if ckpt_path is not None:
            load_state_dict_into(self, ckpt_path)

    def quantize_latents(self, h):
        """h: (B, D, h, w) -> (f_hat, commitment loss, [codes (B, s, s)] per scale)."""
        return self.quantize.quantize_scales(h)

    @torch.no_grad()
    def encode_codes(self, x):
        """x: (B, 3, H, W) -> codes (B, N) int64, every scale flattened, coarsest first."""
        return torch.cat([c.flatten(1) for c in self.quantize_latents(self.encode(x))[2]], dim=1)

    def decode_codes(self, codes):
        """codes: (B, N) int64, as encode_codes gives them -> images (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(self.quantize.decode_codes(self.quantize.split(codes))))
