"""Improvement v2: a multilingual pre-encoder and an aligner in front of the English LDM BERT.

    prompt (any language) --pre_tokenizer--> ids --pre_encoder--> states (B, L, H)
        --aligner--> English BERT input (B, 77, D) --LDM BERT body--> context (B, 77, D)

The LDM BERT keeps its keys (`transformer.*`), so base checkpoints load into this class strictly;
`pre_encoder.*` and `aligner.*` come from `aligner_ckpt` (written by improvement/v2/train_aligner.py).
The pre-encoder is any Hugging Face encoder: a folder or hub name (`AutoModel` + `AutoTokenizer`), or,
for a model trained from scratch, `{config: {BertConfig fields}, tokenizer: tokenizer.json}`. A learned
`*` reaches the UNet through the manager's one seam, at the positions where the aligner writes `*`.
"""
import torch

from improvement.v2.aligner import Aligner
from ldm.cli import UsageError
from ldm.modules.encoders.base import load_pretrained
from ldm.modules.encoders.modules import BERTEmbedder


def encode_embedded(tokens, embeds, body, manager=None, band=0):
    """`encode_tokens` for token embeddings made elsewhere.

    tokens: (B, T) int64 marking where placeholders stand, embeds: (B, T, D), body: (B, T, D) -> (B, T, D);
    band: the manager's timestep band (int or (B,) int64).
    """
    if manager is None:
        return body(embeds)
    with torch.set_grad_enabled(torch.is_grad_enabled() and manager.backprop_through_encoder):
        states = body(manager(tokens, embeds, band=band))
    return manager.output_seam(tokens, states, band)


def build_pre_encoder(spec):
    """-> (tokenizer, encoder) from a folder / hub name, or from {config: {...}, tokenizer: path} (random init)."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerFast

    fix = "give pre_encoder a local Hugging Face encoder folder (config.json, weights, tokenizer files)"
    if isinstance(spec, str):
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot load the pre-encoder's tokenizer from '{spec}' ({type(e).__name__}): {fix}") from e
        return tokenizer, load_pretrained(AutoModel, spec, fix)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(spec["tokenizer"]), **SPECIAL_TOKENS)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **dict(spec["config"]))
    return tokenizer, BertModel(config)


SPECIAL_TOKENS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def read_target_ids(path):
    """The aligner's English target ids stored in an aligner checkpoint -> (V,) int64."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        if "aligner.target_ids" not in f.keys():
            raise ValueError(f"{path} holds no aligner.target_ids: it is not a v2 aligner checkpoint "
                             "(write one with improvement/v2/train_aligner.py)")
        return f.get_tensor("aligner.target_ids")


class MultilingualBERTEmbedder(BERTEmbedder):
    """BERTEmbedder whose input comes from a multilingual pre-encoder through an aligner.

    target_ids: the English ids the aligner can write (read from aligner_ckpt when given);
    decode: "soft" (probability-weighted token embeddings) or "hard" (argmax ids).
    """

    new_parameter_prefixes = ("pre_encoder.", "aligner.")

    def __init__(self, n_embed, n_layer, pre_encoder, aligner=None, aligner_ckpt=None, target_ids=None,
                 decode="soft", max_source_len=64, **bert_options):
        super().__init__(n_embed, n_layer, **bert_options)
        self.pre_tokenizer, self.pre_encoder = build_pre_encoder(pre_encoder)
        if aligner_ckpt is not None:
            target_ids = read_target_ids(aligner_ckpt)
        if target_ids is None:
            raise ValueError("the aligner needs its English target ids: give aligner_ckpt, or target_ids")
        hidden = self.pre_encoder.config.hidden_size
        self.aligner = Aligner(hidden, target_ids, max_seq_len=self.transformer.max_seq_len, **dict(aligner or {}))
        self.decode, self.max_source_len = decode, max_source_len
        if aligner_ckpt is not None:
            self.load_v2_weights(aligner_ckpt)

    def load_v2_weights(self, path):
        """Load `aligner.*` (all required) and `pre_encoder.*` (all or none) from a safetensors file."""
        from safetensors.torch import load_file

        sd = load_file(path)
        own = {k: v.shape for k, v in self.state_dict().items() if k.startswith(self.new_parameter_prefixes)}
        has_pre_encoder = any(k.startswith("pre_encoder.") for k in sd)
        missing = sorted(k for k in set(own) - set(sd) if k.startswith("aligner.") or has_pre_encoder)
        unexpected = sorted(set(sd) - set(own))
        wrong = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k])
        if missing or unexpected or wrong:
            raise UsageError(f"{path} does not fit this v2 conditioner (another aligner or pre-encoder size?): "
                             f"missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}, "
                             f"other shapes e.g. {wrong[:3]}")
        self.load_state_dict(sd, strict=False)

    def source_states(self, text):
        """text: list of B str -> states (B, L, H), attention_mask (B, L) of the pre-encoder."""
        device = self.token_embedding.weight.device
        batch = self.pre_tokenizer(list(text), padding=True, truncation=True, max_length=self.max_source_len,
                                   return_tensors="pt")
        mask = batch["attention_mask"].to(device)
        states = self.pre_encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        return states, mask

    def align(self, text):
        """text: list of B str -> aligner logits (B, 77, V) over `aligner.target_ids`."""
        return self.aligner(*self.source_states(text))

    def forward(self, text, embedding_manager=None, band=0):
        """text: list of B str in any language the pre-encoder was aligned on -> (B, 77, n_embed); band: the
        manager's timestep band (int or (B,) int64)"""
        if isinstance(text, str):
            text = [text]
        ids, embeds = self.aligner.decode(self.align(text), self.token_embedding, self.decode)
        return encode_embedded(ids, embeds, self.transformer.encode_embeddings, embedding_manager, band)

    def english(self, text, embedding_manager=None, band=0):
        """The plain LDM BERT path (the alignment target): English text -> (B, 77, n_embed)."""
        return super().forward(text, embedding_manager=embedding_manager, band=band)
