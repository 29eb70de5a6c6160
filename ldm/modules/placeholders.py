"""Placeholder strings as token ids of a text encoder, and the vectors they start from.

A placeholder that is one token of the encoder's vocabulary keeps that token (the reference's '*');
any other string is registered as new whole-word tokens `s, s_1, ..., s_{n-1}` (diffusers' naming for
n vectors). Learning a vector for an existing *word* would change that word everywhere, so it needs
`allow_existing_token`.
"""
import torch

INJECTIONS = ("input", "output")
INIT_MODES = ("mean", "pieces", "random", "zero")
INIT_PROMPT = "A photo of a {}"  # output injection starts from the encoder's states of the init word here
# Rare characters that are single tokens in both the BERT and CLIP vocabularies; with per_image_tokens
# image i also gets its own placeholder PER_IMAGE_TOKENS[i] (the reference's per-image list).
PER_IMAGE_TOKENS = (
    "א", "ב", "ג", "ד", "ה", "ו", "ז", "ח", "ט", "י", "כ", "ל", "מ", "נ", "ס", "ע", "פ", "צ", "ק", "ר", "ש", "ת",
)


def is_word(string):
    """'dog', 'sks' and 'א' are words; '*' and '@' are symbols the reference uses as placeholders."""
    return any(ch.isalnum() for ch in string)


def find_last(row, pieces):
    """Start of the last occurrence of the list `pieces` in the list `row`, or None."""
    for start in range(len(row) - len(pieces), -1, -1):
        if row[start:start + len(pieces)] == pieces:
            return start
    return None


class PlaceholderVocabulary:
    """The text encoder as the embedding manager sees it.

    Not an nn.Module, so that the encoder's weights stay out of the manager's state dict. The encoder
    provides `token_embedding`, `word_token_ids`, `unk_token_id`, `add_placeholder_token`,
    `placeholder_token_id`, `tokenize` and `encode` (see ldm.modules.encoders.base.TextEncoder).
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self.encoder_name = type(encoder).__name__

    @property
    def token_dim(self):
        return self.encoder.token_embedding.embedding_dim

    @property
    def num_rows(self):
        return self.encoder.token_embedding.num_embeddings

    def vocabulary_token(self, string):
        """The id when `string` is exactly one token of the encoder's own vocabulary, else None."""
        if self.encoder.placeholder_token_id(string) is not None:
            return None
        ids = self.encoder.word_token_ids(string)
        return ids[0] if len(ids) == 1 and ids[0] != self.encoder.unk_token_id else None

    def token_ids(self, string, num_vectors, allow_existing=False):
        """-> tuple of num_vectors ids: (id,) * n for a vocabulary token, else the ids of registered tokens."""
        names = self.new_token_names(string, num_vectors, allow_existing)
        return self.encoder.add_placeholder_tokens(names) if names else (self.vocabulary_token(string),) * num_vectors

    def new_token_names(self, string, num_vectors, allow_existing=False):
        """The tokens `string` with `num_vectors` vectors needs registered ([] for a vocabulary token), after its
        checks (one line each)."""
        if not string.strip() or "." in string:
            raise ValueError(f"placeholder {string!r} is empty or holds a '.', which parameter names cannot: use a "
                             "string such as '*' or '<my-cat>'")
        existing = self.vocabulary_token(string)
        if existing is not None:
            if is_word(string) and not allow_existing:
                raise ValueError(
                    f"placeholder '{string}' is already the vocabulary token {existing} of this text encoder "
                    f"({self.encoder_name}), so training it would change what '{string}' means: pick a new string "
                    f"such as '<{string}-1>' (it becomes a new token) or set allow_existing_token: true "
                    "(train_new.py --allow_existing_token)")
            return []
        names = [string] + [f"{string}_{i}" for i in range(1, num_vectors)]
        for name in names[1:]:
            if self.vocabulary_token(name) is not None:
                raise ValueError(f"'{name}', the token of vector {names.index(name)} of placeholder '{string}', is "
                                 f"already in the vocabulary of {self.encoder_name}: pick another placeholder")
        return names

    def context_id(self, placeholder, ids, init_pieces):
        """The in-table id the encoder looks up at the placeholder's positions before the manager acts:
        the initializer's first piece, else the placeholder's own vocabulary token, else 0."""
        if init_pieces:
            return init_pieces[0]
        return ids[0] if self.vocabulary_token(placeholder) is not None else 0

    def init_pieces(self, word):
        """The ids of an initializer word, checked to be vocabulary tokens."""
        ids = self.encoder.word_token_ids(word)
        inspect = f"inspect it with `python check/init_word.py {word}`"
        if not ids or self.encoder.unk_token_id in ids or max(ids) >= self.num_rows:
            raise ValueError(f"initializer word '{word}' is not in the text encoder's vocabulary: pick another word "
                             f"({inspect})")
        return ids

    def initial_vectors(self, word, pieces, num_vectors, init_mode, injection):
        """word: the initializer word and pieces its ids (init_pieces), or both None -> (num_vectors, D).

        Without pieces: zeros for init_mode 'zero', else uniform [0, 1) (the reference). With pieces:
        the mean of their vectors for every vector ('mean'), or one piece per vector ('pieces'). The
        vectors are token-embedding rows for injection 'input', and for 'output' the encoder's final
        states at the word's positions in INIT_PROMPT. Output 'mean' with n vectors writes the word n times
        into INIT_PROMPT and starts vector k from its k-th occurrence: cross-attention sees no position in
        its context, so n equal output vectors would get equal gradients and stay one vector n times over.
        """
        weight = self.encoder.token_embedding.weight
        if pieces is None:
            make = torch.zeros if init_mode == "zero" else torch.rand
            return make(num_vectors, self.token_dim, device=weight.device, dtype=weight.dtype)
        if injection == "input":
            rows = weight[pieces].detach()
        else:  # 'mean': one occurrence of the word per vector; 'pieces': one occurrence
            rows = self._states_at(word, pieces, num_vectors if init_mode == "mean" else 1)
        if init_mode == "mean":  # rows: one or n occurrences of the k pieces -> their mean per occurrence
            return rows.unflatten(0, (-1, len(pieces))).mean(1).expand(num_vectors, -1).clone()
        if len(pieces) != num_vectors:
            raise ValueError(f"init_mode 'pieces' gives each vector one piece of the initializer word, but it has "
                             f"{len(pieces)} pieces {pieces} and num_vectors_per_token is {num_vectors}: set "
                             f"num_vectors_per_token: {len(pieces)} or init_mode: mean")
        return rows.clone()

    @torch.no_grad()
    def _states_at(self, word, pieces, repeats=1):
        """(repeats * k, D) final states of the encoder at the k pieces of each of `repeats` occurrences of
        `word` in INIT_PROMPT (the word written `repeats` times)."""
        prompt = INIT_PROMPT.format(" ".join([word] * repeats))
        start = find_last(self.encoder.tokenize([prompt])[0].tolist(), list(pieces) * repeats)
        if start is None:
            raise ValueError(f"initializer word '{word}' tokenizes differently inside '{prompt}': pick another word "
                             "or use injection: input")
        return self.encoder.encode([prompt])[0, start:start + repeats * len(pieces)].detach()
