"""Textual inversion: learned vectors that stand in for placeholder tokens in a text encoder.

The manager sits at one seam of the text encoder, `manager(tokens, embeds) -> embeds`, between the
token-embedding lookup and the position embedding. It needs only `embedder.word_token_ids(word)`
and `embedder.token_embedding` (an nn.Embedding), and knows nothing of the diffusion model.
"""
import logging
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.data.personalized import PER_IMAGE_TOKENS
from ldm.util import atomic_path

logger = logging.getLogger(__name__)

PROGRESSIVE_SCALE = 2000  # with progressive_words, one more vector becomes active every 2000 forward calls


def _as_list(strings):
    """A lone string is one word, not a list of characters."""
    if strings is None:
        return []
    return [strings] if isinstance(strings, str) else list(strings)


class EmbeddingManager(nn.Module):
    """Owns `string_to_param_dict[placeholder]: (n, D)` and writes it over the placeholder's embeddings.

    One vector: every placeholder position gets it. n vectors: occurrences are expanded right to
    left into n positions, later tokens shift right and the row is cut back to T; the token ids are
    edited in place the same way. Names of attributes and files follow the reference implementation.
    """

    def __init__(self, embedder, placeholder_strings=("*",), initializer_words=None, per_image_tokens=False,
                 num_vectors_per_token=1, progressive_words=False, **kwargs):
        super().__init__()
        if kwargs:
            logger.warning("EmbeddingManager ignores the unsupported options %s", ", ".join(sorted(kwargs)))
        if int(num_vectors_per_token) < 1:
            raise ValueError(f"num_vectors_per_token is {num_vectors_per_token}: it must be at least 1")
        placeholders = _as_list(placeholder_strings) + (list(PER_IMAGE_TOKENS) if per_image_tokens else [])
        if not placeholders:
            raise ValueError("no placeholder strings given: set placeholder_strings, e.g. ['*']")
        self._word_token_ids = embedder.word_token_ids  # a bound method: the embedder is not registered as a child
        self._unk_token_id = getattr(embedder, "unk_token_id", None)
        self.token_dim = embedder.token_embedding.embedding_dim
        self.progressive_words = progressive_words
        self.progressive_counter = 0
        self.string_to_token_dict = {}
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()  # not optimised; the target of embedding_to_coarse_loss
        initializers = _as_list(initializer_words)
        for i, placeholder in enumerate(placeholders):
            init_word = initializers[i] if i < len(initializers) else None
            self._add_placeholder(placeholder, init_word, int(num_vectors_per_token), embedder.token_embedding)

    def _add_placeholder(self, placeholder, init_word, num_vectors, token_embedding):
        token = self._placeholder_token(placeholder)
        weight = token_embedding.weight
        if init_word is None:
            vectors = torch.rand(num_vectors, self.token_dim, device=weight.device, dtype=weight.dtype)
        else:
            row = weight[self._initializer_token(init_word)].detach()
            vectors = row.expand(num_vectors, -1).clone()
            self.initial_embeddings[placeholder] = nn.Parameter(vectors.clone(), requires_grad=False)
        self.string_to_token_dict[placeholder] = torch.tensor(token, device="cpu")  # cpu even under a meta device
        self.string_to_param_dict[placeholder] = nn.Parameter(vectors)

    def _placeholder_token(self, placeholder):
        ids = self._word_token_ids(placeholder)
        fix = "use a string that is one token of the text encoder's vocabulary, such as '*'"
        if len(ids) != 1:
            raise ValueError(f"placeholder '{placeholder}' is {len(ids)} tokens {ids} for this text encoder, not one: "
                             f"{fix} (multi-token placeholders are not supported yet)")
        if ids[0] == self._unk_token_id:
            raise ValueError(f"placeholder '{placeholder}' is not in the text encoder's vocabulary (it maps to the "
                             f"unknown token shared by every unknown word): {fix}")
        taken = [s for s, t in self.string_to_token_dict.items() if int(t) == ids[0]]
        if taken:
            raise ValueError(f"placeholders '{taken[0]}' and '{placeholder}' are the same token {ids[0]}: "
                             "give each placeholder its own token")
        return ids[0]

    def _initializer_token(self, word):
        ids = self._word_token_ids(word)
        inspect = f"inspect it with `python check/init_word.py {word}`"
        if len(ids) != 1:
            raise ValueError(f"initializer word '{word}' is {len(ids)} tokens {ids} for this text encoder, not one: "
                             f"pick a single-token word ({inspect})")
        if ids[0] == self._unk_token_id:
            raise ValueError(f"initializer word '{word}' is not in the text encoder's vocabulary: pick another word "
                             f"({inspect})")
        return ids[0]

    def forward(self, tokenized_text, embedded_text):
        """tokenized_text: (B, T) int64, embedded_text: (B, T, D) -> (B, T, D).

        With several vectors per placeholder, tokenized_text is rewritten in place to match.
        """
        for placeholder, token in self.string_to_token_dict.items():
            vectors = self.string_to_param_dict[placeholder].to(embedded_text)
            token = int(token)
            if vectors.shape[0] == 1:
                embedded_text = self._replace(tokenized_text, embedded_text, token, vectors[0])
            else:
                vectors = vectors[:self._active_vectors(vectors.shape[0])]
                embedded_text = self._insert(tokenized_text, embedded_text, token, vectors)
        return embedded_text

    @staticmethod
    def _replace(tokens, embeds, token, vector):
        """tokens: (B, T), embeds: (B, T, D), vector: (D,) -> (B, T, D) with vector at every `token` position"""
        return torch.where((tokens == token)[..., None], vector, embeds)

    @staticmethod
    def _insert(tokens, embeds, token, vectors):
        """tokens: (B, T) edited in place, embeds: (B, T, D), vectors: (k, D) -> (B, T, D).

        Each occurrence, right to left, becomes k positions; the row is truncated back to T.
        """
        T, k = tokens.shape[1], vectors.shape[0]
        rows = []
        for b in range(tokens.shape[0]):
            row_tokens, row_embeds = tokens[b], embeds[b]
            for col in reversed((row_tokens == token).nonzero().flatten().tolist()):
                row_tokens = torch.cat([row_tokens[:col], row_tokens.new_full((k,), token), row_tokens[col + 1:]])[:T]
                row_embeds = torch.cat([row_embeds[:col], vectors, row_embeds[col + 1:]])[:T]
            tokens[b] = row_tokens
            rows.append(row_embeds)
        return torch.stack(rows)

    def _active_vectors(self, num_vectors):
        """All vectors, or with progressive_words 1 + calls // PROGRESSIVE_SCALE of them (counted per call)."""
        if not self.progressive_words:
            return num_vectors
        self.progressive_counter += 1
        return min(num_vectors, 1 + self.progressive_counter // PROGRESSIVE_SCALE)

    def embedding_parameters(self):
        """The vectors to optimise: one (n, D) nn.Parameter per placeholder."""
        return list(self.string_to_param_dict.values())

    def embedding_to_coarse_loss(self):
        """() sum over initialised placeholders of ||vectors - initial||^2, divided by their number.

        The reference computes (v - v0) @ (v - v0).T, an (n, n) matrix; for n = 1 this is the same
        value, and for n > 1 this is its trace (the reference's matrix would not backpropagate).
        """
        params = self.embedding_parameters()
        loss = torch.zeros((), device=params[0].device, dtype=params[0].dtype)
        for placeholder, initial in self.initial_embeddings.items():
            diff = self.string_to_param_dict[placeholder] - initial.to(params[0].device)
            loss = loss + (diff * diff).sum() / len(self.initial_embeddings)
        return loss

    def save(self, path):
        """Write `{"string_to_token": {str: LongTensor}, "string_to_param": {str: (n, D)}}` atomically (.pt or .safetensors)."""
        tokens = {s: t.clone() for s, t in self.string_to_token_dict.items()}
        params = {s: p.detach().cpu().clone() for s, p in self.string_to_param_dict.items()}
        with atomic_path(path) as tmp:
            write_embedding_file(tmp, tokens, params, safetensors=os.fspath(path).endswith(".safetensors"))

    def load(self, path):
        """Replace the placeholders and vectors with those of an embedding file; the vector count comes from the file.

        Build the optimizer after loading: the parameters are new objects.
        """
        tokens, params = read_embedding_file(path)
        for placeholder, vectors in params.items():
            self._check_loaded(path, placeholder, tokens[placeholder], vectors)
        reference = self.embedding_parameters()[0]
        initial_rows = {s: p[0] for s, p in self.initial_embeddings.items()}
        self.string_to_token_dict = {s: torch.tensor(t, device="cpu") for s, t in tokens.items()}
        self.string_to_param_dict = nn.ParameterDict(
            {s: nn.Parameter(v.to(reference)) for s, v in params.items()})
        self.initial_embeddings = nn.ParameterDict(
            {s: nn.Parameter(initial_rows[s].expand_as(v).clone(), requires_grad=False)
             for s, v in self.string_to_param_dict.items() if s in initial_rows})

    def _check_loaded(self, path, placeholder, token, vectors):
        if vectors.shape[-1] != self.token_dim:
            raise ValueError(f"embedding file {path} has vectors of width {vectors.shape[-1]} but this model's text "
                             f"encoder uses {self.token_dim}: it was trained for another model")
        ids = self._word_token_ids(placeholder)
        if ids != [int(token)]:
            raise ValueError(f"embedding file {path} maps placeholder '{placeholder}' to token {int(token)} but this "
                             f"text encoder's tokenizer gives {ids}: it was trained with another tokenizer")


def write_embedding_file(path, tokens, params, safetensors=False):
    """tokens: {str: () int64}, params: {str: (n, D)}; .safetensors keys are 'string_to_token.<s>' / 'string_to_param.<s>'."""
    if not safetensors:
        torch.save({"string_to_token": tokens, "string_to_param": params}, path)
        return
    flat = {f"string_to_token.{s}": t.reshape(()) for s, t in tokens.items()}
    flat.update({f"string_to_param.{s}": p.contiguous() for s, p in params.items()})
    save_file(flat, path)


def read_embedding_file(path):
    """path (.pt/.bin/.safetensors) -> ({placeholder: int token}, {placeholder: (n, D) float tensor})."""
    if os.fspath(path).endswith(".safetensors"):
        data = {}
        for key, value in load_file(path).items():
            group, _, placeholder = key.partition(".")
            data.setdefault(group, {})[placeholder] = value
    else:
        # files from the reference pickle an nn.ParameterDict; allowing that one class keeps weights_only loading
        with torch.serialization.safe_globals([nn.ParameterDict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not {"string_to_token", "string_to_param"} <= data.keys() \
            or not data["string_to_param"]:
        raise ValueError(f"{path} is not a textual-inversion embedding file: expected placeholders under the keys "
                         "'string_to_token' and 'string_to_param'")
    tokens = {s: int(t) for s, t in data["string_to_token"].items()}
    params = {s: p.detach().reshape(-1, p.shape[-1]).float() for s, p in data["string_to_param"].items()}
    if tokens.keys() != params.keys():
        raise ValueError(f"embedding file {path} lists placeholders {sorted(tokens)} with vectors for {sorted(params)}: "
                         "the file is damaged; save it again")
    return tokens, params
