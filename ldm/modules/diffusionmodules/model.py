"""Encoder and Decoder of the LDM autoencoders (module names as latent-diffusion's `model.py`)."""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1 conv projections, residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        _, _, h, w = x.shape
        x_ = self.norm(x)
        q, k, v = (rearrange(f(x_), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(ch_in, ch_out, n_blocks, with_attn, dropout):
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(ch_in if i == 0 else ch_out, ch_out, dropout) for i in range(n_blocks))
    level.attn = nn.ModuleList(AttnBlock(ch_out) for _ in range(n_blocks if with_attn else 0))
    return level


def _mid(ch, dropout):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch, dropout), AttnBlock(ch), ResnetBlock(ch, ch, dropout)
    return mid


def _run_level(level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """x: (B, in_channels, H, W) -> (B, 2*z_channels if double_z else z_channels, H/2^(L-1), W/2^(L-1))."""

    def __init__(self, *, ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0, in_channels,
                 resolution, z_channels, double_z=True, resamp_with_conv=True, **ignored):
        super().__init__()
        _check_vanilla(ignored, resamp_with_conv)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult, res = (1,) + tuple(ch_mult), resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _level(ch * in_mult[i], ch * mult, num_res_blocks, res in attn_resolutions, dropout)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(ch * mult)
                res //= 2
            self.down.append(level)
        block_in = ch * ch_mult[-1]
        self.mid = _mid(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """z: (B, z_channels, h, w) -> (B, out_ch, h*2^(L-1), w*2^(L-1)); `up[i]` is level i, run deepest first."""

    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resolution, z_channels, resamp_with_conv=True, tanh_out=False, **ignored):
        super().__init__()
        _check_vanilla(ignored, resamp_with_conv)
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        up = []
        for i in reversed(range(len(ch_mult))):
            level = _level(block_in, ch * ch_mult[i], num_res_blocks + 1, res in attn_resolutions, dropout)
            block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.conv_out(swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


_ACCEPTED = {"in_channels": None, "out_ch": None, "double_z": None, "give_pre_end": False,
             "use_linear_attn": False, "attn_type": "vanilla"}


def _check_vanilla(options, resamp_with_conv):
    bad = {k: v for k, v in options.items() if k not in _ACCEPTED or (_ACCEPTED[k] is not None and _ACCEPTED[k] != v)}
    if not resamp_with_conv:
        bad["resamp_with_conv"] = False
    if bad:
        raise NotImplementedError(f"autoencoder options not supported by this framework: {bad}")
