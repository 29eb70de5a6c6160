"""The TI paper's image similarity: mean pairwise cosine between CLIP image embeddings of generated
samples and of the concept's own images. Needs a CLIP model in a local folder (no hub is reached):

    python check/concept_table.py --clip path/to/clip-vit-base-patch32
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

# The normalisation the CLIP image encoders were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images, size):
    """images: list of (H, W, 3) uint8 (square) -> (N, 3, size, size) float32, resized bicubically and normalised
    as CLIP's image encoders expect."""
    x = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipImageSimilarity:
    """score(samples, references) -> mean cosine over all (sample, reference) pairs, in [-1, 1];
    against(references) -> score(samples), the references embedded once."""

    def __init__(self, path):
        from transformers import CLIPVisionModelWithProjection

        if not os.path.isdir(path):
            raise FileNotFoundError(f"no CLIP model folder at '{path}': pass a local folder saved with "
                                    "save_pretrained (e.g. clip-vit-base-patch32), or leave --clip out")
        self.model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
        self.size = self.model.config.image_size

    def preprocess(self, images):
        """images: list of (H, W, 3) uint8 (square) -> (N, 3, size, size) normalised pixels."""
        return clip_pixels(images, self.size)

    @torch.no_grad()
    def embed(self, images):
        """-> (N, D) unit-norm image embeddings."""
        return F.normalize(self.model(pixel_values=self.preprocess(images)).image_embeds, dim=-1)

    def against(self, references):
        refs = self.embed(references)
        return lambda samples: float((self.embed(samples) @ refs.T).mean())

    def __call__(self, samples, references):
        return self.against(references)(samples)
