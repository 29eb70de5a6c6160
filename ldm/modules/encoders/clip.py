"""SD v1's text encoder: the CLIP ViT-L/14 text tower, output after the final layer norm.

State-dict keys are those of SD v1 checkpoints, `transformer.text_model.*`: transformers 5.x's
CLIPTextModel has no `text_model.` level, so a thin holder module named `transformer` adds it.
"""
import torch
from torch import nn

from ldm.modules.encoders.base import TextEncoder, encode_tokens, load_pretrained
from ldm.modules.encoders.tokenizers import (
    CLIP_VOCAB_SIZE,
    TextTokenizer,
    checked_size,
    load_clip_bpe_tokenizer,
    load_pretrained_tokenizer,
)

# openai/clip-vit-large-patch14, text tower (the SD v1 manifest's clip_text_config)
VIT_L14_TEXT = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
POSITION_IDS = "text_model.embeddings.position_ids"


class CLIPTextHolder(nn.Module):
    """`text_model`: a transformers CLIPTextModel, so that its keys read `text_model.*` as in SD v1.

    Real checkpoints also carry the constant `text_model.embeddings.position_ids` (persistent up to
    transformers 4.30); it is checked (0, 1, ..., T - 1) and dropped on load, so such checkpoints load strictly.
    """

    def __init__(self, text_model):
        super().__init__()
        self.text_model = text_model
        self.register_load_state_dict_pre_hook(self._drop_position_ids)

    @staticmethod
    def _drop_position_ids(module, state_dict, prefix, *args):
        ids = state_dict.pop(prefix + POSITION_IDS, None)
        if ids is not None and not torch.equal(ids.flatten().long().cpu(), torch.arange(ids.numel())):
            raise ValueError(f"{prefix + POSITION_IDS} is not 0, 1, ..., {ids.numel() - 1}: the checkpoint's CLIP "
                             "text model numbers its positions otherwise, which this framework does not support")


def build_clip_text_model(version, text_config):
    """CLIPTextModel from a local folder / hub name, or (version None) the architecture with fresh weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if version is None:
        return CLIPTextModel(CLIPTextConfig(**{**VIT_L14_TEXT, **dict(text_config or {})}))
    return load_pretrained(CLIPTextModel, version, "give version a local folder, or leave it unset to build the "
                                                   "architecture and load weights from the LDM checkpoint")


class FrozenCLIPEmbedder(TextEncoder):
    """Captions -> (B, max_length, width) last hidden states of CLIP's text transformer (causal mask, no padding mask).

    version: local folder or hub name of a CLIPTextModel; None (default) builds ViT-L/14's text tower,
    `text_config` overriding its sizes, and expects the weights from the LDM checkpoint.
    tokenizer_path: local tokenizer folder or hub name; None builds SD v1's tokenizer from open_clip's BPE file.
    layer: "last" (SD v1: after the final layer norm) or "hidden" (SDXL: hidden state `layer_idx`, the output of
    that many encoder layers, without the final layer norm). `device` is accepted and ignored (reference configs
    pass it), as is SDXL's always_return_pooled false.
    """

    def __init__(self, version=None, text_config=None, tokenizer_path=None, max_length=77, device=None,
                 freeze=True, layer="last", layer_idx=None, always_return_pooled=False):
        super().__init__()
        if layer not in ("last", "hidden") or (layer == "hidden") != (layer_idx is not None) or always_return_pooled:
            raise ValueError(f"layer '{layer}', layer_idx {layer_idx}, always_return_pooled {always_return_pooled}: "
                             "use layer last, or layer hidden with a layer_idx; always_return_pooled false")
        self.layer, self.layer_idx = layer, layer_idx
        self.transformer = CLIPTextHolder(build_clip_text_model(version, text_config))
        vocab = self.token_embedding.num_embeddings
        if tokenizer_path is None:
            tokenizer = checked_size(load_clip_bpe_tokenizer(), "open_clip BPE", vocab,
                                     "set text_config.vocab_size to 49408 or give tokenizer_path")
        else:
            tokenizer = checked_size(load_pretrained_tokenizer(tokenizer_path, clip=True), tokenizer_path, vocab,
                                     "give the tokenizer that belongs to this text model")
        self.tokenizer = TextTokenizer(tokenizer, max_length)
        if freeze:
            self.freeze()

    @property
    def token_embedding(self):
        return self.transformer.text_model.embeddings.token_embedding

    def forward(self, text, embedding_manager=None, band=0):
        """text: list of B str -> (B, max_length, width); band: the manager's timestep band (int or (B,) int64)"""
        return encode_tokens(self.tokenize(text), self.token_embedding, self._encode_embeddings, embedding_manager,
                             band)

    def _encode_embeddings(self, embeds):
        """embeds: (B, T, D) token embeddings -> (B, T, D) states after the final layer norm (layer "last") or
        hidden state `layer_idx` (layer "hidden").

        CLIPTextModel.forward takes only ids in transformers 5.x, so its three stages are called here
        with the same causal mask it builds.
        """
        from transformers.masking_utils import create_causal_mask

        model = self.transformer.text_model
        x = model.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, past_key_values=None)
        if self.layer == "hidden":  # hidden_states[k]: the output of the first k layers (the rest need not run)
            for layer in model.encoder.layers[:self.layer_idx]:
                x = layer(x, mask, is_causal=True)
            return x
        x = model.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
        return model.final_layer_norm(x)

