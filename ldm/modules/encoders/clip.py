"""SD v1's text encoder: the CLIP ViT-L/14 text tower, output after the final layer norm.

State-dict keys are those of SD v1 checkpoints, `transformer.text_model.*`: transformers 5.x's
CLIPTextModel has no `text_model.` level, so a thin holder module named `transformer` adds it.
"""
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
    transformers 4.30); it is dropped on load, so such checkpoints load strictly.
    """

    def __init__(self, text_model):
        super().__init__()
        self.text_model = text_model
        self.register_load_state_dict_pre_hook(self._drop_position_ids)

    @staticmethod
    def _drop_position_ids(module, state_dict, prefix, *args):
        state_dict.pop(prefix + POSITION_IDS, None)


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
    `device` is accepted and ignored (reference configs pass it).
    """

    def __init__(self, version=None, text_config=None, tokenizer_path=None, max_length=77, device=None,
                 freeze=True):
        super().__init__()
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
        """embeds: (B, T, D) token embeddings -> (B, T, D) states after the final layer norm.

        CLIPTextModel.forward takes only ids in transformers 5.x, so its three stages are called here
        with the same causal mask it builds.
        """
        from transformers.masking_utils import create_causal_mask

        model = self.transformer.text_model
        x = model.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, past_key_values=None)
        x = model.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
        return model.final_layer_norm(x)

