"""Textual inversion: learned vectors that stand in for placeholder tokens in a text encoder.

The manager meets a text encoder at one seam (ldm.modules.encoders.base.encode_tokens, through its `input_seam`
and `output_seam`) and knows nothing of the diffusion model; on token embeddings made elsewhere it is called as

    manager(tokens: (B, T) int64, embeds: (B, T, D), band=0) -> (B, T, D)

Every seam takes `band` (an int, or (B,) int64: one per row), the timestep band whose vectors it writes: the
diffusion model passes it with the captions, `cond_stage_model.encode(captions, embedding_manager=manager,
band=band)`, and the encoder hands it on. Two injection points, chosen in the config:
- `input` (the paper): the vectors replace the placeholder's token embeddings; gradients flow
  through the frozen encoder;
- `output` (seeds/000's design): the vectors replace the encoder's final states at the placeholder's
  positions; the encoder runs without autograd, its states memoised per caption (StateCache), and a vector
  starts from the encoder's states of its initializer word in "A photo of a {word}" (n vectors: of its n
  occurrences in "A photo of a {word} ... {word}").
Placeholder positions are found by token id. Ids past the encoder's embedding table (placeholders
registered as new tokens) never reach it: the manager looks up an in-table id there first.
"""
import logging

import torch
from torch import nn

from ldm.modules.embedding_formats import EmbeddingFileError, Embeddings, band_edges, read_embeddings, write_embeddings
from ldm.modules.encoders.state_cache import StateCache
from ldm.modules.placeholder_positions import expand_occurrences, write_vectors
from ldm.modules.placeholders import INIT_MODES, INJECTIONS, PER_IMAGE_TOKENS, PlaceholderVocabulary

logger = logging.getLogger(__name__)

PROGRESSIVE_SCALE = 2000  # with progressive_words, one more vector becomes active every 2000 forward calls


def _as_list(strings):
    """A lone string is one word, not a list of characters."""
    if strings is None:
        return []
    return [strings] if isinstance(strings, str) else list(strings)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} is '{value}': use one of {', '.join(allowed)}")
    return value


def _claim(owners, placeholder, ids):
    """Record `placeholder` as the owner of its token ids in `owners` ({id: placeholder}, filled in place); an id
    another placeholder (or the same string given twice) owns is an error. One dict lookup per id."""
    for token in dict.fromkeys(ids):
        if token in owners:
            raise ValueError(f"placeholders '{owners[token]}' and '{placeholder}' are the same token {token}: "
                             "give each placeholder its own token")
        owners[token] = placeholder


class EmbeddingManager(nn.Module):
    """Owns `string_to_param_dict[placeholder]: (n, D)` and writes it over the placeholder's positions.

    One vector: every placeholder position gets it. n vectors: each occurrence expands into n
    positions, later tokens shift right and the row is cut back to T; the token ids are edited in
    place the same way. Names of attributes and files follow the reference implementation.
    With `timestep_bands` (edges e_1 < ... < e_k) the manager holds k + 1 sets of n vectors, one per band
    of diffusion timesteps [0, e_1), ..., [e_k, T), stacked as (bands * n, D); the seams' `band` argument picks the
    set written (an int, or a (B,) tensor of one band per row).
    """

    def __init__(self, embedder, placeholder_strings=("*",), initializer_words=None, per_image_tokens=False,
                 num_vectors_per_token=1, progressive_words=False, injection="input", init_mode="mean",
                 allow_existing_token=False, timestep_bands=None, **kwargs):
        super().__init__()
        if kwargs:
            logger.warning("EmbeddingManager ignores the unsupported options %s", ", ".join(sorted(kwargs)))
        if int(num_vectors_per_token) < 1:
            raise ValueError(f"num_vectors_per_token is {num_vectors_per_token}: it must be at least 1")
        placeholders = _as_list(placeholder_strings) + (list(PER_IMAGE_TOKENS) if per_image_tokens else [])
        if not placeholders:
            raise ValueError("no placeholder strings given: set placeholder_strings, e.g. ['*']")
        self.vocab = PlaceholderVocabulary(embedder)
        self.state_cache = StateCache(embedder)
        self.token_dim = self.vocab.token_dim
        self.injection = _choice("injection", injection, INJECTIONS)
        self.init_mode = _choice("init_mode", init_mode, INIT_MODES)
        self.allow_existing_token = bool(allow_existing_token)
        self.progressive_words = progressive_words
        self.progressive_counter = 0
        self.timestep_bands = band_edges(timestep_bands)
        self.string_to_token_dict = {}  # placeholder -> () int64, its (first) token id
        self.placeholder_ids = {}  # placeholder -> one token id per vector
        self.context_ids = {}  # placeholder -> the in-table id the encoder looks up at its positions
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()  # not optimised; the target of embedding_to_coarse_loss
        initializers, owners = _as_list(initializer_words), {}
        for i, placeholder in enumerate(placeholders):
            init_word = initializers[i] if i < len(initializers) else None
            _claim(owners, placeholder, self._add_placeholder(placeholder, init_word, int(num_vectors_per_token)))

    @property
    def backprop_through_encoder(self):
        """Whether the encoder's forward must be recorded for autograd (input injection only)."""
        return self.injection == "input"

    def _allow(self, placeholder):
        """Whether `placeholder` may be a vocabulary word (the reference's per-image letters always may)."""
        return self.allow_existing_token or placeholder in PER_IMAGE_TOKENS

    def _token_ids(self, placeholder, num_vectors):
        return self.vocab.token_ids(placeholder, num_vectors, self._allow(placeholder))

    def _add_placeholder(self, placeholder, init_word, num_vectors):
        """Register `placeholder` with `num_vectors` vectors started from `init_word` -> its token ids."""
        if init_word is not None and self.init_mode in ("random", "zero"):
            raise ValueError(f"init_mode '{self.init_mode}' starts '{placeholder}' without an initializer word, but "
                             f"'{init_word}' is given: drop initializer_words (--init_word) or use init_mode mean")
        ids = self._token_ids(placeholder, num_vectors)
        pieces = None if init_word is None else self.vocab.init_pieces(init_word)
        vectors = self.vocab.initial_vectors(init_word, pieces, num_vectors, self.init_mode, self.injection)
        vectors = vectors.repeat(self.num_bands, 1)  # every band starts from the same vectors
        if init_word is not None:
            self.initial_embeddings[placeholder] = nn.Parameter(vectors.clone(), requires_grad=False)
        self._register(placeholder, ids, vectors, self.vocab.context_id(placeholder, ids, pieces))
        return ids

    def _register(self, placeholder, ids, vectors, context_id):
        self.placeholder_ids[placeholder] = ids
        self.context_ids[placeholder] = context_id
        self.string_to_token_dict[placeholder] = torch.tensor(ids[0], device="cpu")  # cpu even under a meta device
        self.string_to_param_dict[placeholder] = nn.Parameter(vectors)

    # ---- the seams ------------------------------------------------------------------------------
    def forward(self, tokenized_text, embedded_text, band=0):
        """The input seam on precomputed token embeddings (the reference's signature, and the timestep band).

        tokenized_text: (B, T) int64, rewritten in place when a placeholder has several vectors;
        embedded_text: (B, T, D); band: int or (B,) int64 -> (B, T, D).
        """
        for src in self._expand(tokenized_text):
            embedded_text = embedded_text.gather(1, src[..., None].expand(-1, -1, embedded_text.shape[-1]))
        return self._write(tokenized_text, embedded_text, band) if self.injection == "input" else embedded_text

    def input_seam(self, tokens, token_embedding, band=0):
        """tokens: (B, T) int64 (edited in place), token_embedding: the encoder's nn.Embedding, band: int or (B,)
        int64 -> (B, T, D).

        Placeholder ids are looked up as their context id (so that no id past the table reaches it),
        then, for input injection, overwritten with the band's vectors.
        """
        self._expand(tokens)
        embeds = token_embedding(self.context_tokens(tokens))
        return self._write(tokens, embeds, band) if self.injection == "input" else embeds

    def frozen_states(self, tokens, token_embedding, body):
        """Output injection's encoder pass: tokens (B, T) int64 (edited in place as by input_seam), token_embedding,
        body: (B, T, D) embeddings -> (B, T, D) states, without autograd and memoised per row of looked-up ids."""
        self._expand(tokens)
        with torch.no_grad():
            return self.state_cache(self.context_tokens(tokens), lambda ids: body(token_embedding(ids)))

    def output_seam(self, tokens, states, band=0):
        """tokens: (B, T) as left by input_seam, states: (B, T, D) final encoder states, band: int or (B,) int64
        -> (B, T, D)."""
        return self._write(tokens, states, band) if self.injection == "output" else states

    def _expand(self, tokens):
        """Expand multi-vector placeholders in `tokens` (in place) -> one (B, T) gather index per expansion."""
        multi = [ids for ids in self.placeholder_ids.values() if len(ids) > 1]
        if multi and self.progressive_words:
            self.progressive_counter += 1
        active = [(ids, self._active_vectors(len(ids))) for ids in multi]
        return [expand_occurrences(tokens, ids, k) for ids, k in active if k > 1]

    def context_tokens(self, tokens):
        """(B, T) ids with each placeholder id replaced by its context id; ids left past the table are an error."""
        for placeholder, ids in self.placeholder_ids.items():
            tokens = torch.where(torch.isin(tokens, torch.tensor(ids, device=tokens.device)),
                                 self.context_ids[placeholder], tokens)
        if tokens.numel() and int(tokens.max()) >= self.vocab.num_rows:
            raise ValueError(f"the prompt holds token id {int(tokens.max())}, past the text encoder's "
                             f"{self.vocab.num_rows} rows: a placeholder this manager no longer holds (its embedding "
                             f"was replaced by load): load that embedding or drop the word from the prompt")
        return tokens

    def _write(self, tokens, x, band):
        """x: (B, T, D) -> (B, T, D) with each placeholder's active vectors at its positions, of the timestep band
        `band`: one int for every row, or (B,) int64, a band per row."""
        for placeholder, ids in self.placeholder_ids.items():
            sets = self.string_to_param_dict[placeholder].to(x).unflatten(0, (self.num_bands, len(ids)))
            x = write_vectors(tokens, x, ids, sets[band][..., :self._active_vectors(len(ids)), :])
        return x

    @property
    def num_bands(self):
        """Sets of vectors: one per timestep band (len(timestep_bands) + 1), stacked in each (bands * n, D)."""
        return len(self.timestep_bands) + 1

    def _active_vectors(self, num_vectors):
        """All vectors, or with progressive_words 1 + calls // PROGRESSIVE_SCALE of them."""
        if not self.progressive_words:
            return num_vectors
        return min(num_vectors, 1 + self.progressive_counter // PROGRESSIVE_SCALE)

    # ---- training -------------------------------------------------------------------------------
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

    # ---- files ----------------------------------------------------------------------------------
    def to_embeddings(self):
        """The manager's state as an Embeddings record (original format fields)."""
        fields = {} if self.injection == "input" else {"injection": self.injection,
                                                       "context_token": dict(self.context_ids)}
        if self.timestep_bands:
            fields["timestep_bands"] = list(self.timestep_bands)
        return Embeddings({s: p.detach().cpu().clone() for s, p in self.string_to_param_dict.items()},
                          {s: ids[0] for s, ids in self.placeholder_ids.items()}, fields)

    def save(self, path):
        """Write the original format atomically: .pt, or .safetensors by suffix."""
        write_embeddings(self.to_embeddings(), path, "original")

    def load(self, path, name=None):
        """Replace the placeholders and vectors with those of an embedding file in any supported format.

        The vector count comes from the file; `name` names the placeholder of files without one (kohya).
        Build the optimizer after loading: the parameters are new objects. A file this manager cannot use raises
        EmbeddingFileError, one line naming it, before the placeholders and vectors change. The manager's own work
        grows linearly with the file (all new tokens registered in one call, checks by dict lookups), and a
        placeholder holds at most the tokens a prompt holds.
        """
        self.load_embeddings(read_embeddings(path, name), path)

    def load_embeddings(self, emb, path):
        """`load` of an Embeddings record read from `path` (named in messages); SDXL's manager reads its own files."""
        self._check_compatible(path, emb)
        vectors = emb.matrices()
        bands = band_edges(emb.fields.get("timestep_bands"))
        counts = {s: v.shape[0] // (len(bands) + 1) for s, v in vectors.items()}  # the reader checked they divide
        self._check_capacity(path, counts)
        ids = self._file_token_ids(path, counts)
        for placeholder, recorded in emb.tokens.items():
            self._check_recorded_token(path, placeholder, recorded, ids[placeholder])
        contexts = emb.fields.get("context_token", {})
        self._check_contexts(path, contexts)
        previous = {s: self.context_ids.get(s) for s in vectors}
        initial_rows = {s: p[0] for s, p in self.initial_embeddings.items()}
        reference = self.embedding_parameters()[0]
        self.placeholder_ids, self.context_ids, self.string_to_token_dict = {}, {}, {}
        self.timestep_bands = bands
        self.string_to_param_dict = nn.ParameterDict()
        for placeholder, v in vectors.items():
            context = contexts.get(placeholder, previous[placeholder])
            if context is None:
                context = self.vocab.context_id(placeholder, ids[placeholder], None)
            self._register(placeholder, ids[placeholder], v.to(reference), context)
        self.initial_embeddings = nn.ParameterDict(
            {s: nn.Parameter(initial_rows[s].expand_as(v).clone(), requires_grad=False)
             for s, v in self.string_to_param_dict.items() if s in initial_rows})

    def _check_capacity(self, path, counts):
        """counts: {placeholder: vectors per band}; none may exceed the tokens a prompt holds (checked before any
        token is registered: an absurd count would register that many tokens)."""
        capacity = self._context_capacity()
        for placeholder, count in counts.items():
            if count > capacity:
                raise EmbeddingFileError(
                    f"embedding file {path} has {count} vectors for '{placeholder}' but a prompt of this text encoder "
                    f"({self.vocab.encoder_name}) holds {capacity} tokens besides its start and end tokens: a "
                    "placeholder cannot have more vectors than that; the file is damaged or made for another model")

    def _context_capacity(self):
        """Tokens a prompt holds: the tokenizer's max_length less the start/end tokens it adds."""
        tokenizer = self.vocab.encoder.tokenizer
        return tokenizer.max_length - tokenizer.tokenizer.num_special_tokens_to_add()

    def _file_token_ids(self, path, counts):
        """{placeholder: token ids} for a file's placeholders (counts: vectors per band), or one line naming the file
        (a vocabulary word without allow_existing_token, two placeholders on one token)."""
        ids, owners = {}, {}
        try:
            names = [n for p, count in counts.items() for n in self.vocab.new_token_names(p, count, self._allow(p))]
            self.vocab.encoder.add_placeholder_tokens(names)  # every new token in one registration
            for placeholder, count in counts.items():
                ids[placeholder] = self._token_ids(placeholder, count)
                _claim(owners, placeholder, ids[placeholder])
        except ValueError as e:
            raise EmbeddingFileError(f"embedding file {path}: {e}") from e
        return ids

    def _check_contexts(self, path, contexts):
        """Recorded context ids ({placeholder: id}) must be rows of this encoder's token-embedding table."""
        for placeholder, context in contexts.items():
            if context >= self.vocab.num_rows:
                raise EmbeddingFileError(
                    f"embedding file {path} looks up token {context} for '{placeholder}' but this text encoder "
                    f"({self.vocab.encoder_name}) has {self.vocab.num_rows} tokens: it was made for another model")

    def _check_compatible(self, path, emb):
        width = next(iter(emb.vectors.values())).shape[-1]
        if width != self.token_dim:
            raise EmbeddingFileError(f"embedding file {path} has vectors of width {width} but this model's text "
                                     f"encoder uses {self.token_dim} ({self.vocab.encoder_name}): it was trained for "
                                     "another model")
        if emb.injection != self.injection:
            raise EmbeddingFileError(f"embedding file {path} holds vectors for injection '{emb.injection}' but this "
                                     f"manager injects at the '{self.injection}': set injection: {emb.injection} in "
                                     "the personalization config")

    def _check_recorded_token(self, path, placeholder, recorded, ids):
        """A vocabulary-token placeholder must have the id the file's tokenizer gave it (-1: not recorded)."""
        if recorded >= 0 and self.vocab.vocabulary_token(placeholder) is not None and recorded != ids[0]:
            raise EmbeddingFileError(f"embedding file {path} maps placeholder '{placeholder}' to token {recorded} but "
                                     f"this text encoder's tokenizer ({self.vocab.encoder_name}) gives {ids[0]}: it "
                                     "was trained with another tokenizer")
