"""SD 2.x's text encoder: the OpenCLIP ViT-H/14 text tower, read after its penultimate block and `ln_final`; and
SDXL's second one (FrozenOpenCLIPEmbedder2): ViT-bigG/14, read before its last block without `ln_final`, plus the
pooled projection.

Parameter names and their order are open_clip's (`model.token_embedding.weight`, `model.positional_embedding`,
`model.transformer.resblocks.N.attn.in_proj_weight`, ...), so SD 2.x checkpoints load strictly; open_clip
itself is not imported (it needs torchvision). The tokenizer is OpenAI's CLIP BPE, padded with 0 as
`open_clip.tokenize` pads (SD v1's CLIP pads with <|endoftext|>).
"""
import math
from collections import OrderedDict

import torch
from torch import nn

from ldm.modules.encoders.base import TextEncoder, encode_tokens
from ldm.modules.encoders.tokenizers import CLIP_VOCAB_SIZE, TextTokenizer, checked_size, load_clip_bpe_tokenizer

# open_clip's text towers by model name (its model configs' text_cfg and embed_dim)
ARCHS = {"ViT-H-14": dict(width=1024, heads=16, layers=24, embed_dim=1024),
         "ViT-bigG-14": dict(width=1280, heads=20, layers=32, embed_dim=1280)}
LAYERS = {"last": 0, "penultimate": 1}  # resblocks left out at the end (the reference's layer_idx)
PAD_ID = 0  # open_clip.tokenize pads with 0, the token "!"
EOS_ID = 49407  # <|endoftext|>: the pooled state is read at its first position


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block of open_clip: x + attn(ln_1(x)), then x + mlp(ln_2(x)), exact GELU, LayerNorm eps 1e-5.

    `attn` is an nn.MultiheadAttention, as in open_clip: its packed q, k, v projection `in_proj_weight` (3W, W) and
    `out_proj` are the checkpoint's keys (the UNet's CrossAttention keeps separate to_q/to_k/to_v and takes no mask).
    """

    def __init__(self, width, heads, mlp_ratio=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = width * mlp_ratio
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x, attn_mask):
        """x: (B, T, W), attn_mask: (T, T) additive -> (B, T, W)"""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The `transformer.resblocks.N` level of open_clip's keys; the tower runs the blocks it needs."""

    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


class OpenCLIPTextTower(nn.Module):
    """What SD 2.x keeps of open_clip's CLIP: the text tower (the visual tower is deleted).

    `text_projection` (W, embed_dim) and `logit_scale` are stored, as in the checkpoints; SD 2.x uses neither,
    SDXL's pooled vector is `ln_final(x)[eos] @ text_projection`.
    """

    def __init__(self, width, heads, layers, embed_dim, context_length=77, vocab_size=CLIP_VOCAB_SIZE):
        super().__init__()
        # parameters, then submodules, in open_clip's order: the state dict lists them so
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        self.transformer = Transformer(width, layers, heads)
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, embeds, skip_last=0):
        """embeds: (B, T, W) token embeddings -> (B, T, W): ln_final of the output of all resblocks but the last
        `skip_last`, under the causal mask (no padding mask: pad positions are encoded too)."""
        return self.ln_final(self.run_blocks(embeds + self.positional_embedding[:embeds.shape[1]], 0,
                                             len(self.transformer.resblocks) - skip_last))

    def run_blocks(self, x, start, stop):
        """x: (B, T, W) states -> (B, T, W) after resblocks start..stop-1 under the causal mask."""
        T = x.shape[1]
        mask = torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        for block in self.transformer.resblocks[start:stop]:
            x = block(x, mask)
        return x

    def pooled(self, penultimate, tokens):
        """penultimate: (B, T, W) input of the last block, tokens: (B, T) int64 -> (B, embed_dim):
        ln_final(last block's output) at each row's first <|endoftext|>, projected by text_projection."""
        blocks = len(self.transformer.resblocks)
        x = self.ln_final(self.run_blocks(penultimate, blocks - 1, blocks))
        eos = (tokens == EOS_ID).int().argmax(dim=1)  # open_clip's argmax of the ids, unless ids past 49407 occur
        return x[torch.arange(x.shape[0], device=x.device), eos] @ self.text_projection


class OpenCLIPTokenizer(TextTokenizer):
    """open_clip.tokenize's ids: [49406, BPE ids, 49407] padded with 0 (truncated: the last id is 49407)."""

    def __call__(self, texts):
        """texts: list of B str -> (B, max_length) int64"""
        ids = super().__call__(texts)
        is_end = ids == self.tokenizer.eos_token_id
        after_end = (is_end.cumsum(1) - is_end.long()) > 0  # the tokenizer padded these with <|endoftext|>
        return ids.masked_fill(after_end, PAD_ID)


class FrozenOpenCLIPEmbedder(TextEncoder):
    """Captions -> (B, 77, width) states of an OpenCLIP text tower: SD 2.x's conditioning with layer "penultimate".

    arch: the open_clip model whose text tower is built ("ViT-H-14"), `text_config` overriding its sizes
    (width, heads, layers, embed_dim, context_length, vocab_size). version: the reference's open_clip pretrained
    tag; nothing is downloaded here, so it must stay unset and the weights come from the LDM checkpoint
    (`cond_stage_model.model.*`). layer: "last" (ln_final after every block) or "penultimate" (after all but the
    last). `device` is accepted and ignored (reference configs pass it).
    """

    def __init__(self, arch="ViT-H-14", version=None, text_config=None, device=None, max_length=77, freeze=True,
                 layer="last"):
        super().__init__()
        if version is not None:
            raise ValueError(f"version '{version}' names open_clip weights to download, which this framework does "
                             "not do: leave version unset; the Stable Diffusion checkpoint holds the text tower")
        if arch not in ARCHS or layer not in LAYERS:
            raise ValueError(f"arch '{arch}', layer '{layer}': use arch {', '.join(ARCHS)} and layer "
                             f"{' or '.join(LAYERS)}")
        self.model = OpenCLIPTextTower(**{**ARCHS[arch], **dict(text_config or {})})
        self.layer, self.layer_idx = layer, LAYERS[layer]
        tokenizer = checked_size(load_clip_bpe_tokenizer(), "open_clip BPE", self.token_embedding.num_embeddings,
                                 "set text_config.vocab_size to 49408")
        self.tokenizer = OpenCLIPTokenizer(tokenizer, max_length)
        if freeze:
            self.freeze()

    @property
    def token_embedding(self):
        return self.model.token_embedding

    def forward(self, text, embedding_manager=None, band=0):
        """text: list of B str -> (B, max_length, width); band: the manager's timestep band (int or (B,) int64)"""
        return encode_tokens(self.tokenize(text), self.token_embedding, self._encode_embeddings, embedding_manager,
                             band)

    def _encode_embeddings(self, embeds):
        """embeds: (B, T, W) token embeddings -> (B, T, W) conditioning states"""
        return self.model(embeds, skip_last=self.layer_idx)


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's OpenCLIP text encoder (sgm's FrozenOpenCLIPEmbedder2 with layer "penultimate", always_return_pooled,
    legacy False): captions -> (B, 77, width) states entering the last block, no ln_final; `encode_with_pooled`
    adds the pooled (B, embed_dim) vector. Only that configuration of the reference is built.
    """

    def __init__(self, arch="ViT-bigG-14", version=None, text_config=None, device=None, max_length=77, freeze=True,
                 layer="penultimate", always_return_pooled=True, legacy=False):
        if layer != "penultimate" or not always_return_pooled or legacy:
            raise ValueError(f"layer '{layer}', always_return_pooled {always_return_pooled}, legacy {legacy}: SDXL's "
                             "embedder uses layer penultimate, always_return_pooled true and legacy false")
        super().__init__(arch, version, text_config, device, max_length, freeze, layer)

    def _encode_embeddings(self, embeds):
        """embeds: (B, T, W) token embeddings -> (B, T, W) output of all blocks but the last (no ln_final)"""
        model = self.model
        x = embeds + model.positional_embedding[:embeds.shape[1]]
        return model.run_blocks(x, 0, len(model.transformer.resblocks) - 1)

    def encode_with_pooled(self, text, embedding_manager=None, band=0):
        """text: list of B str -> (states (B, T, W), pooled (B, embed_dim)); the pooled vector comes from the
        states the manager left (placeholder vectors included) and the token ids as it expanded them."""
        if isinstance(text, str):
            text = [text]
        tokens = self.tokenize(text)
        states = encode_tokens(tokens, self.token_embedding, self._encode_embeddings, embedding_manager, band)
        return states, self.model.pooled(states, tokens)
