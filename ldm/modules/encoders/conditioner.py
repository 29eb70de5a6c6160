"""SDXL's conditioner under sgm's names (`conditioner.embedders.N`): two text encoders and three size embedders.

A batch {"txt": B captions, "original_size_as_tuple": (B, 2), "crop_coords_top_left": (B, 2),
"target_size_as_tuple": (B, 2)} becomes
    crossattn (B, 77, D_l + D_g) = cat(CLIP-L hidden states, OpenCLIP bigG penultimate states), and
    vector (B, E_g + 3 * 2 * 256) = cat(bigG pooled, the three (h, w) / (top, left) embeddings).
Textual inversion reaches each text encoder through its own EmbeddingManager (the SDXL manager hands them out by
the names "clip_l" and "clip_g"), at the usual seam `encode_tokens`.
"""
import torch
from einops import rearrange
from torch import nn

from ldm.modules.attention import timestep_embedding
from ldm.modules.encoders.clip import FrozenCLIPEmbedder
from ldm.modules.encoders.openclip import FrozenOpenCLIPEmbedder2
from ldm.util import instantiate_from_config

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
TEXT_KEY = "txt"


class ConcatTimestepEmbedderND(nn.Module):
    """x: (B, N) numbers -> (B, N * outdim): each number's sinusoidal embedding cat(cos, sin), concatenated."""

    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        b = x.shape[0]
        emb = timestep_embedding(rearrange(x.reshape(b, -1), "b d -> (b d)"), self.outdim)
        return rearrange(emb, "(b d) e -> b (d e)", b=b)


def _text_name(embedder):
    """"clip_l" or "clip_g": the key of this text encoder's vectors in SDXL embedding files."""
    if isinstance(embedder, FrozenOpenCLIPEmbedder2):
        return "clip_g"
    if isinstance(embedder, FrozenCLIPEmbedder):
        return "clip_l"
    raise ValueError(f"{type(embedder).__name__} reads 'txt': SDXL's text embedders are FrozenCLIPEmbedder and "
                     "FrozenOpenCLIPEmbedder2")


class GeneralConditioner(nn.Module):
    """sgm's GeneralConditioner for SDXL base. emb_models: a list of {input_key, embedder: {target, params}}, in
    sgm's order (sgm writes input_key and is_trainable beside target; here the embedder is a node of its own); text
    embedders read "txt", size embedders one of SIZE_KEYS. The embedders are frozen and captions never dropped
    (sgm's is_trainable false, ucg_rate 0): neither is part of textual inversion.
    """

    def __init__(self, emb_models):
        super().__init__()
        embedders, self.input_keys = [], []
        for i, node in enumerate(emb_models):
            if set(node) != {"input_key", "embedder"} or node["input_key"] not in (TEXT_KEY, *SIZE_KEYS):
                raise ValueError(f"conditioner embedder {i}: give input_key ({TEXT_KEY} or {', '.join(SIZE_KEYS)}) "
                                 f"and embedder (a target node), got keys {sorted(node)}")
            embedders.append(instantiate_from_config(node["embedder"]))
            self.input_keys.append(node["input_key"])
        self.embedders = nn.ModuleList(embedders)
        self.text_names = {i: _text_name(e) for i, (e, key) in enumerate(zip(embedders, self.input_keys))
                           if key == TEXT_KEY}
        if sorted(self.text_names.values()) != ["clip_g", "clip_l"]:
            raise ValueError("the SDXL conditioner needs one FrozenCLIPEmbedder and one FrozenOpenCLIPEmbedder2")

    @property
    def text_encoders(self):
        """{"clip_l": CLIP-L embedder, "clip_g": OpenCLIP bigG embedder}"""
        return {name: self.embedders[i] for i, name in self.text_names.items()}

    def freeze(self):
        self.requires_grad_(False)
        return self.eval()

    def forward(self, batch, embedding_manager=None, band=0, zero_text=False):
        """batch: dict of "txt" (B str) and SIZE_KEYS ((B, 2) numbers) -> {"crossattn": (B, T, D_l + D_g),
        "vector": (B, E_g + 1536)}. zero_text: the text outputs are zeros (sgm's force_uc_zero_embeddings=["txt"],
        its unconditional branch for SDXL), the size embeddings kept. embedding_manager: None or an object with
        `part(name)` -> the EmbeddingManager of text encoder `name` (or None)."""
        crossattn, vector = [], []
        for i, (embedder, key) in enumerate(zip(self.embedders, self.input_keys)):
            if key != TEXT_KEY:
                device = next(iter(self.parameters())).device
                vector.append(embedder(torch.as_tensor(batch[key], device=device)))
                continue
            manager = None if embedding_manager is None else embedding_manager.part(self.text_names[i])
            states, pooled = self._encode_text(embedder, list(batch[TEXT_KEY]), manager, band, zero_text)
            crossattn.append(states)
            if pooled is not None:
                vector.append(pooled)
        dtype = crossattn[0].dtype
        return {"crossattn": torch.cat(crossattn, dim=2), "vector": torch.cat([v.to(dtype) for v in vector], dim=1)}

    @staticmethod
    def _encode_text(embedder, captions, manager, band, zero_text):
        """-> (states (B, T, D), pooled (B, E) or None) of one text embedder; zeros of those shapes for zero_text."""
        if zero_text:
            weight = embedder.token_embedding.weight
            states = weight.new_zeros(len(captions), embedder.tokenizer.max_length, weight.shape[1])
            if isinstance(embedder, FrozenOpenCLIPEmbedder2):
                return states, weight.new_zeros(len(captions), embedder.model.text_projection.shape[1])
            return states, None
        if isinstance(embedder, FrozenOpenCLIPEmbedder2):
            return embedder.encode_with_pooled(captions, manager, band)
        return embedder(captions, manager, band), None
