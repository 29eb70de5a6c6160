"""A T5 encoder as text conditioning (Imagen / Infinity style), loaded from a local folder or hub name."""
from ldm.modules.encoders.base import TextEncoder, encode_tokens, load_pretrained
from ldm.modules.encoders.tokenizers import TextTokenizer, load_pretrained_tokenizer

PROBE = "a photo of a dog"  # a tokenizer that cannot spell this without unknown pieces is the wrong file


def checked_t5_tokenizer(tokenizer, source, vocab_size):
    """`tokenizer` if its ids fit the embedding table and it knows plain English, else one clear line."""
    fix = "give the tokenizer that belongs to this T5 model"
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer from '{source}' has {len(tokenizer)} entries but the T5 embedding table holds "
                         f"{vocab_size}: {fix}")
    if tokenizer.unk_token_id in tokenizer(PROBE, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"tokenizer from '{source}' ({len(tokenizer)} entries) has no pieces for '{PROBE}': "
                         f"it is not a T5 vocabulary (an empty hub cache?): {fix}")
    return tokenizer


class FrozenT5Embedder(TextEncoder):
    """Captions -> (B, max_length, d_model) last hidden states of a T5 encoder.

    As in the reference T5 embedder, no padding mask is passed: pads are encoded like LDM's BERT pads.
    version: local folder or hub name of a T5EncoderModel (and its tokenizer unless tokenizer_path is given).
    """

    def __init__(self, version="google/t5-v1_1-large", tokenizer_path=None, max_length=77, device=None, freeze=True):
        super().__init__()
        from transformers import T5EncoderModel

        self.transformer = load_pretrained(T5EncoderModel, version, "give version a local folder holding config.json "
                                                                    "and the weights")
        source = tokenizer_path or version
        tokenizer = checked_t5_tokenizer(load_pretrained_tokenizer(source), source, self.token_embedding.num_embeddings)
        self.tokenizer = TextTokenizer(tokenizer, max_length)
        if freeze:
            self.freeze()

    @property
    def token_embedding(self):
        return self.transformer.get_input_embeddings()

    def forward(self, text, embedding_manager=None, band=0):
        """text: list of B str -> (B, max_length, d_model); band: the manager's timestep band (int or (B,) int64)"""
        return encode_tokens(self.tokenize(text), self.token_embedding, self._encode_embeddings, embedding_manager,
                             band)

    def _encode_embeddings(self, embeds):
        """embeds: (B, T, D) token embeddings -> (B, T, D) final states"""
        return self.transformer(inputs_embeds=embeds).last_hidden_state
