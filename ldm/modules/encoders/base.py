"""What every text encoder offers the diffusion model and the embedding manager.

An encoder maps captions to cross-attention context `(B, T, D)`; its tokenizer, token-embedding
table and freezing behave the same for BERT, CLIP and T5, so the manager needs no encoder-specific code.
"""
import torch
from torch import nn


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class TextEncoder(AbstractEncoder):
    """Subclasses set `self.tokenizer` (a TextTokenizer, or None for id inputs) and define
    `token_embedding` (an nn.Embedding) and `forward(text, embedding_manager=None, band=0) -> (B, T, D)`, which
    hands the manager and the timestep band `band` (int, or (B,) int64) to `encode_tokens`."""

    tokenizer = None
    frozen = False

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError(f"this {type(self).__name__} was built with use_tokenizer=False: pass token ids, or "
                               "build it with use_tokenizer=True to encode text")
        return self.tokenizer

    def tokenize(self, texts):
        """texts: list of B str -> (B, max_length) int64 on the weights' device"""
        if isinstance(texts, str):
            texts = [texts]
        return self._require_tokenizer()(texts).to(self.token_embedding.weight.device)

    def word_token_ids(self, word):
        """The ids `word` tokenizes to, without start/end tokens: 'dog' -> [3899] for BERT."""
        return self._require_tokenizer().word_ids(word)

    @property
    def unk_token_id(self):
        return self._require_tokenizer().unk_token_id

    def add_placeholder_tokens(self, strings):
        """Register each of `strings` as a whole-word token of this encoder's tokenizer -> their ids (one call).

        The ids may lie past the token-embedding table: the embedding manager maps them before the lookup.
        """
        return self._require_tokenizer().add_placeholders(strings)

    def add_placeholder_token(self, string):
        """add_placeholder_tokens of one string -> its id."""
        return self.add_placeholder_tokens([string])[0]

    def placeholder_token_id(self, string):
        """The id `add_placeholder_token` gave `string`, or None."""
        return self._require_tokenizer().placeholder_ids.get(string)

    def encode(self, text, embedding_manager=None, band=0):
        return self(text, embedding_manager=embedding_manager, band=band)

    def freeze(self):
        """Eval mode and no gradients, kept through later `.train()` calls (Lightning calls it each epoch)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        return super().train(mode and not self.frozen)


def encode_tokens(tokens, token_embedding, body, manager=None, band=0):
    """The one seam between a text encoder and a textual-inversion manager.

    tokens: (B, T) int64 (edited in place when a placeholder expands to several vectors),
    token_embedding: the encoder's nn.Embedding, body: (B, T, D) token embeddings -> (B, T, D) states;
    band: the manager's timestep band, int or (B,) int64 (one per row), whose vectors are written.
    The manager's input seam produces the token embeddings; when the manager injects at the output the
    body runs through its `frozen_states` instead (no autograd, states memoised); its output seam edits the states.
    """
    if manager is None:
        return body(token_embedding(tokens))
    if manager.backprop_through_encoder:
        states = body(manager.input_seam(tokens, token_embedding, band))
    else:
        states = manager.frozen_states(tokens, token_embedding, body)
    return manager.output_seam(tokens, states, band)


def load_pretrained(model_class, source, fix):
    """model_class.from_pretrained(source) (a local folder or hub name), failing in one line that ends in `fix`."""
    # transformers swaps torch.linspace while it builds a model on the meta device, and torch caches its set of
    # factory functions the first time one runs inside a device context: fill that cache with the genuine
    # functions first, or later `with torch.device(...)` blocks would leave torch.linspace on the CPU.
    with torch.device("cpu"):
        torch.empty(0)
    try:
        return model_class.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load a {model_class.__name__} from '{source}' ({type(e).__name__}): {fix}") from e
