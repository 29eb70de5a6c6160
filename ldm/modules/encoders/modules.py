"""Conditioning encoders under the dotted names of the reference configs.

`BERTEmbedder` is LDM's text encoder (x-transformers body, bert-base-uncased tokenizer);
`FrozenCLIPEmbedder` (SD v1), `FrozenOpenCLIPEmbedder` (SD 2.x) and `FrozenT5Embedder` live in their own files
and are re-exported here, because released configs name them `ldm.modules.encoders.modules.<Class>`.
"""
from ldm.modules.encoders.base import AbstractEncoder, TextEncoder
from ldm.modules.encoders.clip import FrozenCLIPEmbedder
from ldm.modules.encoders.openclip import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.t5 import FrozenT5Embedder
from ldm.modules.encoders.tokenizers import TextTokenizer, default_bert_source, load_bert_tokenizer
from ldm.modules.x_transformer import Encoder, TransformerWrapper

__all__ = ["AbstractEncoder", "BERTEmbedder", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "FrozenT5Embedder"]


class BERTEmbedder(TextEncoder):
    """LDM's text encoder: captions -> (B, max_seq_len, n_embed) cross-attention context.

    `device` is accepted and ignored (old configs pass it); tokens follow the weights' device.
    use_checkpoint: gradient checkpointing of the transformer layers (saves memory when the
    embedding is learned at the input, where the gradient flows through the encoder).
    """

    def __init__(self, n_embed, n_layer, vocab_size=30522, max_seq_len=77, device=None, use_tokenizer=True,
                 embedding_dropout=0.0, tokenizer_path=None, use_checkpoint=False):
        super().__init__()
        self.frozen = False
        self.use_tokenizer = use_tokenizer
        if use_tokenizer:
            source = tokenizer_path or default_bert_source()
            self.tokenizer = TextTokenizer(load_bert_tokenizer(source, vocab_size), max_seq_len)
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer,
                                                                  use_checkpoint=use_checkpoint),
                                              emb_dropout=embedding_dropout)

    @property
    def token_embedding(self):
        """The nn.Embedding(vocab_size, n_embed) looked up before the position embedding."""
        return self.transformer.token_emb

    def forward(self, text, embedding_manager=None, band=0):
        """text: list of B str (or (B, T) int64 ids when use_tokenizer=False) -> (B, T, n_embed); band: the
        manager's timestep band (int or (B,) int64)"""
        tokens = self.tokenize(text) if self.use_tokenizer else text.to(self.token_embedding.weight.device)
        return self.transformer(tokens, return_embeddings=True, embedding_manager=embedding_manager, band=band)
