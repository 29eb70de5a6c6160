"""SDXL textual-inversion files: one set of vectors per text encoder.

    {"clip_l": (n, 768), "clip_g": (n, 1280)}   (.safetensors; .pt read too)

the layout diffusers (`load_textual_inversion(state_dict["clip_l"], text_encoder=..., tokenizer=...)`, then
"clip_g"), kohya's sd-scripts and AUTOMATIC1111 read and write for SDXL. Such files name no placeholder: those
tools use the file's stem; files written here also record it in the safetensors header ("placeholder"), which
the other tools ignore. Reading never runs pickled code; a file that is not an SDXL embedding is refused in one
line (EmbeddingFileError).
"""
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.modules.embedding_formats import EmbeddingFileError, check_placeholder
from ldm.util import atomic_path

KEYS = ("clip_l", "clip_g")
PLACEHOLDER_KEY = "placeholder"
MAX_VECTORS = 75  # a prompt of either encoder holds 75 tokens besides its start and end tokens


def write_xl_embeddings(vectors, path, placeholder=None):
    """vectors: {"clip_l": (n, D_l), "clip_g": (n, D_g)} -> a safetensors file at `path`, written atomically."""
    _check(path, vectors)
    meta = {} if placeholder is None else {PLACEHOLDER_KEY: check_placeholder(path, placeholder)}
    tensors = {k: vectors[k].detach().float().cpu().contiguous() for k in KEYS}
    with atomic_path(os.fspath(path)) as tmp:
        save_file(tensors, tmp, metadata=meta)


def read_xl_embeddings(path):
    """-> ({"clip_l": (n, D_l), "clip_g": (n, D_g)} float32, the recorded placeholder or None)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedding file not found: {path}")
    placeholder = None
    try:
        with safe_open(path, "pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
            placeholder = (f.metadata() or {}).get(PLACEHOLDER_KEY)
    except (SafetensorError, OSError, ValueError):
        data = _torch_dict(path)
    if not isinstance(data, dict) or set(data) != set(KEYS):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise EmbeddingFileError(f"{path} is not an SDXL embedding: expected the tensors 'clip_l' and 'clip_g', found "
                                 f"{found}; SD 1.x/2.x embeddings do not fit SDXL's two text encoders")
    _check(path, data)
    if placeholder is not None:
        check_placeholder(path, placeholder)
    return {k: data[k].float() for k in KEYS}, placeholder


def is_xl_embedding(path):
    """Whether `path` is a safetensors file whose tensors are exactly clip_l and clip_g (no error for others)."""
    try:
        with safe_open(os.fspath(path), "pt") as f:
            return set(f.keys()) == set(KEYS)
    except (SafetensorError, OSError, ValueError):
        return False


def _torch_dict(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure is a file we cannot use
        raise EmbeddingFileError(f"{path} is neither safetensors nor a torch file of tensors "
                                 f"({type(e).__name__}): give an SDXL embedding (.safetensors)") from e


def _check(path, vectors):
    """Both sets (n, D) floating, finite, the same n in 1..MAX_VECTORS."""
    counts = set()
    for key in KEYS:
        v = vectors.get(key)
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or not v.is_floating_point():
            raise EmbeddingFileError(f"{path}: '{key}' must be an (n, D) floating tensor, got "
                                     f"{getattr(v, 'shape', type(v).__name__)}")
        if not torch.isfinite(v).all():
            raise EmbeddingFileError(f"{path}: '{key}' holds inf or NaN values: the embedding diverged or the file "
                                     "is damaged")
        counts.add(v.shape[0])
    if len(counts) != 1 or not 0 < counts.pop() <= MAX_VECTORS:
        raise EmbeddingFileError(f"{path}: 'clip_l' and 'clip_g' must hold the same number of vectors, 1 to "
                                 f"{MAX_VECTORS}; got {vectors['clip_l'].shape[0]} and {vectors['clip_g'].shape[0]}")
