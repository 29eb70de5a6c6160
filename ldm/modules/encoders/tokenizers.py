"""Tokenizers of the text encoders, built offline: bert-base-uncased (LDM), CLIP BPE (SD v1), any local/hub folder.

transformers 5.x can return a near-empty tokenizer without an error (an offline hub name with an empty
cache, or `CLIPTokenizer(vocab_file=...)`), so every loader checks the vocabulary size.
"""
import copy
import gzip
import json
import logging
import os
import tempfile
from functools import lru_cache

from ldm.implementation import current
from ldm.util import memoised_rows

logger = logging.getLogger(__name__)

BERT_HUB_NAME = "bert-base-uncased"
VOCAB_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")  # shipped files: vocab/README.md
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
MEMO_SIZE = 4096  # captions whose ids a TextTokenizer keeps
CLIP_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>"}  # SD v1 pads with <|endoftext|> (49407)


class TextTokenizer:
    """A Hugging Face fast tokenizer as the encoders and the embedding manager use it.

    Captions become fixed-length ids (the tokenizer's specials, its pad id, truncated). Placeholder
    tokens are added to a private copy, made on the first addition, so that a token added for one
    model never appears in another model sharing the cached tokenizer. Caption ids are memoised while
    `Implementation.memoise_captions` is on (off: every call tokenizes, as the reference).
    """

    def __init__(self, tokenizer, max_length):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.placeholder_ids = {}  # strings added by add_placeholders -> their ids
        self._owns_tokenizer = False
        self._ids = {}  # caption -> (max_length,) ids: a TI run tokenizes the same few captions at every step

    def __call__(self, texts):
        """texts: list of B str -> (B, max_length) int64 on the CPU, a new tensor"""
        def tokenize(missing):
            return self.tokenizer(missing, padding="max_length", max_length=self.max_length, truncation=True,
                                  return_tensors="pt")["input_ids"]
        if not current().memoise_captions:
            return tokenize(list(texts))
        return memoised_rows(self._ids, list(texts), tokenize, MEMO_SIZE)

    def word_ids(self, word):
        """The ids of `word` without start/end tokens."""
        return self.tokenizer(word, add_special_tokens=False)["input_ids"]

    def pieces(self, ids):
        """Vocabulary strings of `ids`, e.g. [11389, 4783] -> ['teddy', '##be']."""
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    @property
    def unk_token_id(self):
        return self.tokenizer.unk_token_id

    def add_placeholders(self, strings):
        """Add each of `strings` as one whole-word token -> their ids (the same ids for strings added before). The
        new ones are added in one call: the tokenizer rebuilds its matcher of added tokens at every call."""
        from tokenizers import AddedToken

        new = [s for s in dict.fromkeys(strings) if s not in self.placeholder_ids]
        if new:
            if not self._owns_tokenizer:
                self.tokenizer, self._owns_tokenizer = copy.deepcopy(self.tokenizer), True
            # single_word: 'sks' must not match inside 'asks'
            self.tokenizer.add_tokens([AddedToken(s, single_word=True) for s in new])
            self._ids.clear()
            self.placeholder_ids.update({s: self.tokenizer.convert_tokens_to_ids(s) for s in new})
        return tuple(self.placeholder_ids[s] for s in strings)


def checked_size(tokenizer, source, expected, fix):
    """`tokenizer` if it holds `expected` entries, else one line naming the source and the fix."""
    if len(tokenizer) != expected:
        raise ValueError(f"tokenizer from '{source}' has {len(tokenizer)} entries but the text encoder expects "
                         f"{expected}: {fix}")
    return tokenizer


def default_bert_source():
    """The shipped bert-base-uncased vocabulary folder."""
    return os.path.join(VOCAB_FOLDER, "bert-base-uncased")


@lru_cache(maxsize=4)
def load_bert_tokenizer(source, vocab_size):
    """A BertTokenizerFast from a local folder or hub name, checked to hold `vocab_size` entries."""
    from transformers import BertTokenizerFast

    fix = f"set tokenizer_path to a local {BERT_HUB_NAME} folder (the framework ships one: reinstall it)"
    try:
        tokenizer = BertTokenizerFast.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load the BERT tokenizer from '{source}' ({type(e).__name__}): {fix}") from e
    logger.info("BERT tokenizer loaded from %s", source)
    return checked_size(tokenizer, source, vocab_size, fix)


@lru_cache(maxsize=4)
def load_pretrained_tokenizer(source, clip=False):
    """A tokenizer from a local folder or hub name (CLIPTokenizer when `clip`, else AutoTokenizer);
    callers check its size."""
    from transformers import AutoTokenizer, CLIPTokenizer

    try:
        return (CLIPTokenizer if clip else AutoTokenizer).from_pretrained(source)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load a tokenizer from '{source}' ({type(e).__name__}): give tokenizer_path a local "
                      "folder with the encoder's tokenizer files (hub names need the files in the local cache)") from e


def _bytes_to_unicode():
    """CLIP's reversible byte -> printable character table (256 entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return dict(zip(printable + extra, map(chr, codes)))


def write_clip_tokenizer_files(folder):
    """Write vocab.json, merges.txt and tokenizer_config.json of OpenAI's CLIP tokenizer from its shipped BPE file."""
    path = os.path.join(VOCAB_FOLDER, CLIP_BPE_FILE)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]  # line 0 is a header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += [CLIP_SPECIALS["bos_token"], CLIP_SPECIALS["eos_token"]]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77, **CLIP_SPECIALS}, f)


@lru_cache(maxsize=1)
def load_clip_bpe_tokenizer():
    """SD v1's CLIP tokenizer (openai/clip-vit-large-patch14), built offline from the shipped BPE file."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    return checked_size(tokenizer, CLIP_BPE_FILE, CLIP_VOCAB_SIZE, "reinstall the framework (its vocab/ folder)")
