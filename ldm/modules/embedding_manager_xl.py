"""Textual inversion on SDXL: one EmbeddingManager per text encoder, both trained, saved together in one file.

The placeholder gets `clip_l` vectors (n, 768) in CLIP-L and `clip_g` vectors (n, 1280) in OpenCLIP bigG, each
started from the initializer word in its own encoder. The conditioner asks for each encoder's manager with
`part(name)` and passes it through the encoder's usual seam (`encode_tokens`); the file is SDXL's
{"clip_l", "clip_g"} layout (ldm.modules.embedding_formats_xl). Input injection, one placeholder and one set of
vectors (no timestep bands) are what that layout holds, so they are what this manager builds.
"""
import os

from torch import nn

from ldm.modules.embedding_formats import EmbeddingFileError, Embeddings
from ldm.modules.embedding_formats_xl import read_xl_embeddings, write_xl_embeddings
from ldm.modules.embedding_manager import EmbeddingManager


class SDXLEmbeddingManager(nn.Module):
    """embedder: the SDXL GeneralConditioner; the other options are EmbeddingManager's, given to both parts."""

    timestep_bands = ()
    num_bands = 1
    backprop_through_encoder = True

    def __init__(self, embedder, placeholder_strings=("*",), per_image_tokens=False, injection="input",
                 timestep_bands=None, **options):
        super().__init__()
        if injection != "input" or timestep_bands or per_image_tokens:
            raise ValueError(f"SDXL textual inversion: injection '{injection}', timestep_bands {timestep_bands}, "
                             f"per_image_tokens {per_image_tokens}: SDXL embedding files hold input vectors of one "
                             "placeholder; use injection input without timestep_bands or per_image_tokens")
        strings = [placeholder_strings] if isinstance(placeholder_strings, str) else list(placeholder_strings)
        if len(strings) != 1:
            raise ValueError(f"placeholder_strings {strings}: an SDXL embedding file holds one placeholder")
        self.parts = nn.ModuleDict({name: EmbeddingManager(encoder, strings, **options)
                                    for name, encoder in sorted(embedder.text_encoders.items(), reverse=True)})

    def part(self, name):
        """The EmbeddingManager of text encoder "clip_l" or "clip_g"."""
        return self.parts[name]

    @property
    def placeholder(self):
        return next(iter(self.parts["clip_l"].string_to_param_dict))

    @property
    def string_to_param_dict(self):
        """{placeholder: (n, D_l)}: CLIP-L's vectors (the placeholder names are the same in both parts)."""
        return self.parts["clip_l"].string_to_param_dict

    @property
    def string_to_token_dict(self):
        return self.parts["clip_l"].string_to_token_dict

    def embedding_parameters(self):
        """CLIP-L's vectors, then bigG's: both train."""
        return [p for part in self.parts.values() for p in part.embedding_parameters()]

    def embedding_to_coarse_loss(self):
        """() sum of both parts' distances to their initial vectors."""
        return sum(part.embedding_to_coarse_loss().to(self.embedding_parameters()[0].device)
                   for part in self.parts.values())

    def vectors(self):
        """{"clip_l": (n, D_l), "clip_g": (n, D_g)} detached on the CPU."""
        return {name: part.string_to_param_dict[self.placeholder].detach().cpu() for name, part in self.parts.items()}

    def save(self, path):
        """Write SDXL's layout to `path` with the suffix .safetensors (a .pt name is changed) -> the path written."""
        path = os.path.splitext(os.fspath(path))[0] + ".safetensors"
        write_xl_embeddings(self.vectors(), path, self.placeholder)
        return path

    def load(self, path, name=None):
        """Replace the vectors with those of an SDXL file; the placeholder is `name`, else the one the file records,
        else the file's stem (kohya's and A1111's convention). Both parts are checked before either changes."""
        vectors, recorded = read_xl_embeddings(path)
        placeholder = name or recorded or os.path.splitext(os.path.basename(os.fspath(path)))[0]
        for key, part in self.parts.items():
            if vectors[key].shape[1] != part.token_dim:
                raise EmbeddingFileError(f"embedding file {path} has '{key}' vectors of width {vectors[key].shape[1]} "
                                         f"but this model's {key} encoder uses {part.token_dim}: it was trained for "
                                         "another model")
        for key, part in self.parts.items():
            part.load_embeddings(Embeddings({placeholder: vectors[key]}, {}, {}, "kohya"), path)
