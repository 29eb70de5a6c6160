"""The optional CLIP image-image similarity of the concept evaluator, on a tiny random CLIP vision model."""
import numpy as np
import pytest
import torch

from check.clip_similarity import ClipImageSimilarity
from ldm.data.shapes.concepts import CONCEPTS
from ldm.data.shapes.scores import evaluate_concept
from ldm.data.shapes.world import render


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=16, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return ClipImageSimilarity(str(folder))


def _renders(attrs, n, seed):
    rng = np.random.default_rng(seed)
    return [render({"colour": "red", **attrs}, rng) for _ in range(n)]  # a concept holds in any colour


def test_similarity_is_a_mean_cosine(clip):
    spec = CONCEPTS[0]
    a, b = _renders(spec["attributes"], 3, 0), _renders({**spec["attributes"], "background": "mint"}, 2, 1)
    assert clip.preprocess(a).shape == (3, 3, 64, 64)
    assert clip(a[:1], a[:1]) == pytest.approx(1.0, abs=1e-5)
    assert clip(a, b) == pytest.approx(clip(b, a), abs=1e-6) and -1.0 <= clip(a, b) <= 1.0
    pairs = np.mean([clip([x], [y]) for x in a for y in b])
    assert clip(a, b) == pytest.approx(pairs, abs=1e-5)


def test_evaluator_reports_it_and_a_missing_folder_is_one_clear_error(clip, tmp_path):
    spec = CONCEPTS[0]
    refs = _renders(spec["attributes"], 2, 5)
    result = evaluate_concept(lambda prompt, n: _renders(spec["attributes"], n, 3), spec, n=2,
                              image_score=lambda images: clip(images, refs))
    assert result["pseudo_word"]["image_similarity"] == pytest.approx(clip(_renders(spec["attributes"], 2, 3), refs))
    assert "image_similarity" in result["init_word"]
    assert "image_similarity" not in evaluate_concept(lambda p, n: refs, spec, n=2)["pseudo_word"]
    with pytest.raises(FileNotFoundError, match="no CLIP model folder"):
        ClipImageSimilarity(str(tmp_path / "absent"))
