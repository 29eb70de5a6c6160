"""Residual quantisation over a pyramid of scales (the next-scale, VAR-style token maps), on taming's codebook.

    f (B, D, h, w) --for s in scales: quantise area-resize(f - f_hat, s) to codes (B, s, s);
                     f_hat += phi_k(upsample(codebook[codes], h))--> f_hat, the sum over all scales

Scale k's codes are nearest codebook entries of what the coarser scales left over, so the 1x1 map holds the
image's overall look and each finer one a correction. A transformer predicting scale k sees the coarser
scales' sum resized to scale k (`next_scale_inputs`); `add_scale` is the same step one scale at a time.
"""
import torch
import torch.nn.functional as F
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn


class MultiScaleQuantizer(VectorQuantizer2):
    """One codebook (n_e entries of dimension e_dim) shared by every scale; `scales` end at the feature map's side."""

    def __init__(self, n_e, e_dim, scales=(1, 2, 4, 8), beta=0.25, phi_ratio=0.5):
        super().__init__(n_e, e_dim, beta=beta, sane_index_shape=True, legacy=False)
        self.scales, self.phi_ratio = tuple(scales), phi_ratio
        self.phi = nn.ModuleList(nn.Conv2d(e_dim, e_dim, 3, padding=1) for _ in self.scales)
        for conv in self.phi:  # start as the identity: a warm start from a one-scale codebook decodes as before
            nn.init.dirac_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def side(self):
        return self.scales[-1]

    def codes_per_scale(self):
        return [s * s for s in self.scales]

    def split(self, codes):
        """codes: (B, N) all scales flattened, coarsest first -> list of (B, s, s) int64."""
        return [c.view(-1, s, s) for c, s in zip(codes.split(self.codes_per_scale(), dim=1), self.scales)]

    def empty_features(self, codes):
        """codes: (B, ...) of any scale -> zeros (B, D, h, w), the sum of no scales."""
        weight = self.embedding.weight
        return torch.zeros(codes.shape[0], self.e_dim, self.side, self.side, device=weight.device, dtype=weight.dtype)

    def add_scale(self, f_hat, codes, k):
        """f_hat: (B, D, h, w) sum of scales < k, codes: (B, s_k, s_k) -> f_hat with scale k added."""
        z = self.embedding(codes).permute(0, 3, 1, 2)
        if self.scales[k] != self.side:
            z = F.interpolate(z, size=(self.side, self.side), mode="bicubic", align_corners=False)
        z = z + self.phi_ratio * (self.phi[k](z) - z)
        return f_hat + z

    def quantize_scales(self, f):
        """f: (B, D, h, w) -> (f_hat straight-through to f, codebook + commitment loss, [codes (B, s, s)] per scale)."""
        f_hat, codes = torch.zeros_like(f), []
        for k, s in enumerate(self.scales):
            rest = F.interpolate(f - f_hat, size=(s, s), mode="area") if s != self.side else f - f_hat
            _, _, (_, _, idx) = super().forward(rest.detach())
            codes.append(idx)
            f_hat = self.add_scale(f_hat, idx, k)
        loss = self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
        return f + (f_hat - f).detach(), loss, codes

    def decode_codes(self, codes):
        """[codes (B, s, s)] per scale -> f_hat (B, D, h, w)."""
        f_hat = self.empty_features(codes[0])
        for k, idx in enumerate(codes):
            f_hat = self.add_scale(f_hat, idx, k)
        return f_hat

    def resized(self, f_hat, k):
        """f_hat: (B, D, h, w) -> (B, s_k * s_k, D), the transformer's input tokens for scale k."""
        s = self.scales[k]
        return F.interpolate(f_hat, size=(s, s), mode="area").flatten(2).transpose(1, 2)

    def next_scale_inputs(self, codes):
        """[codes (B, s, s)] per scale -> (B, N - 1, D): for each scale after the first, the coarser scales' sum
        resized to it (teacher forcing of every scale at once)."""
        f_hat, inputs = self.empty_features(codes[0]), []
        for k, idx in enumerate(codes[:-1]):
            f_hat = self.add_scale(f_hat, idx, k)
            inputs.append(self.resized(f_hat, k + 1))
        return torch.cat(inputs, dim=1)
