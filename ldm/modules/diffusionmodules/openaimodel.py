"""The LDM denoiser: a UNet of ResBlocks with SpatialTransformer cross-attention.

Module names follow latent-diffusion's `openaimodel.py` so that its checkpoints load strictly.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer, timestep_embedding, zero_module
from ldm.modules.diffusionmodules.util import checkpoint, conv_nd, normalization


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        if use_conv:
            self.op = conv_nd(dims, channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + per-channel time embedding, GN-SiLU-dropout-conv(zero-init), + skip."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, dims=2, use_checkpoint=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       conv_nd(dims, channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else conv_nd(dims, channels, out_channels, 1)

    def forward(self, x, emb):
        """x: (B, C, H, W), emb: (B, E) -> (B, C_out, H, W)."""
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


def _heads(ch, num_heads, num_head_channels, legacy):
    """(heads, dim_head) of a SpatialTransformer with `ch` channels, as the reference derives them."""
    if num_head_channels == -1:
        heads, dim_head = num_heads, ch // num_heads
    else:
        heads, dim_head = ch // num_head_channels, num_head_channels
    if legacy:
        dim_head = ch // num_heads
    return heads, dim_head


class UNetModel(nn.Module):
    """eps_theta(x_t, t, context), or v_theta for a v-model. Only the cross-attention variant of the reference is
    built; use_linear_in_transformer (SD 2.x) stores the transformers' 1x1 projections as nn.Linear.

    SDXL: transformer_depth may be a list (one depth per level; the middle block takes the last), and
    num_classes "sequential" with adm_in_channels adds `label_emb.0` = Linear, SiLU, Linear on the vector
    conditioning y, added to the time embedding.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 use_checkpoint=False, num_heads=-1, num_head_channels=-1, transformer_depth: int | list = 1,
                 context_dim=None, legacy=True, use_spatial_transformer=True, use_linear_in_transformer=False,
                 num_classes=None, adm_in_channels=None, spatial_transformer_attn_type="softmax", **unsupported):
        super().__init__()
        _reject_unsupported(unsupported, use_spatial_transformer)
        if spatial_transformer_attn_type not in ("softmax", "softmax-xformers"):  # the same function, same keys
            raise NotImplementedError(f"spatial_transformer_attn_type '{spatial_transformer_attn_type}': use softmax")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels = model_channels
        ted = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = _label_embedding(num_classes, adm_in_channels, ted)
        depths = _depths(transformer_depth, len(channel_mult))

        def block(ch_in, ch_out, ds, level):
            layers = [ResBlock(ch_in, ted, dropout, ch_out, dims, use_checkpoint)]
            if ds in attention_resolutions:
                heads, dim_head = _heads(ch_out, num_heads, num_head_channels, legacy)
                layers.append(SpatialTransformer(ch_out, heads, dim_head, depths[level], context_dim=context_dim,
                                                 checkpoint=use_checkpoint, use_linear=use_linear_in_transformer))
            return layers

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(*block(ch, mult * model_channels, ds, level)))
                ch = mult * model_channels
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims, ch)))
                chans.append(ch)
                ds *= 2

        heads, dim_head = _heads(ch, num_heads, num_head_channels, legacy)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, dropout, ch, dims, use_checkpoint),
            SpatialTransformer(ch, heads, dim_head, depths[-1], context_dim=context_dim,
                               checkpoint=use_checkpoint, use_linear=use_linear_in_transformer),
            ResBlock(ch, ted, dropout, ch, dims, use_checkpoint),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = block(ch + chans.pop(), model_channels * mult, ds, level)
                ch = model_channels * mult
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))

    def forward(self, x, timesteps, context=None, y=None):
        """x: (B, C, H, W), timesteps: (B,) int, context: (B, M, Cc), y: (B, adm_in_channels) for a model with
        label_emb (SDXL's vector conditioning) -> eps or v: (B, C_out, H, W)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if (y is None) != (self.label_emb is None):
            raise ValueError("y (the vector conditioning) must be given exactly when the UNet has num_classes")
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


def _label_embedding(num_classes, adm_in_channels, ted):
    """SDXL's `label_emb`: Sequential(Sequential(Linear(adm_in_channels, ted), SiLU, Linear(ted, ted))), or None."""
    if num_classes is None:
        return None
    if num_classes != "sequential" or not adm_in_channels:
        raise NotImplementedError(f"num_classes={num_classes!r}: only 'sequential' with adm_in_channels (SDXL's "
                                  "vector conditioning) is supported")
    return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))


def _depths(transformer_depth, levels):
    """transformer_depth: int (every level) or one int per level -> list of `levels` depths."""
    if isinstance(transformer_depth, int):
        return [transformer_depth] * levels
    depths = [int(d) for d in transformer_depth]
    if len(depths) != levels:
        raise ValueError(f"transformer_depth {depths} has {len(depths)} entries for {levels} levels of channel_mult: "
                         "give one depth per level")
    return depths


_DEFAULTS = dict(use_fp16=False, disable_self_attentions=None, num_attention_blocks=None,
                 disable_middle_self_attn=False, disable_middle_transformer=False, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False, n_embed=None)


def _reject_unsupported(options, use_spatial_transformer):
    """Accept the reference's option names at their defaults; fail clearly on variants not built here."""
    bad = {k: v for k, v in options.items() if k not in _DEFAULTS or _DEFAULTS[k] != v}
    if not use_spatial_transformer:
        bad["use_spatial_transformer"] = False
    if bad:
        raise NotImplementedError(f"UNetModel options not supported by this framework: {bad} "
                                  "(remove them from the config)")
