"""The shapes world: determinism, held-out concepts, captions that name only shape and colour, scene homes."""
import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.shapes.concepts import CONCEPT_ATTRIBUTES, CONCEPT_TUPLES, CONCEPTS, concept_key
from ldm.data.shapes.draw import CANVAS, rasterize
from ldm.data.shapes.palette import NAMED, SCENE_PHRASE, SCENES, TEMPLATES, UNNAMED, VALUES
from ldm.data.shapes.readers import read_attributes
from ldm.data.shapes.world import ShapesWorld, caption, render, sample_attributes, write_concept_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples(n, p_home=0.95, held_out=CONCEPT_TUPLES, seed=0, p_scene=0.8):
    """n draws of (attrs, scene)."""
    rng = np.random.default_rng(seed)
    return [sample_attributes(rng, held_out=held_out, p_scene=p_scene, p_home=p_home) for _ in range(n)]


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
    attrs = {**CONCEPTS[0]["attributes"], "colour": "red"}
    first = render(attrs, np.random.default_rng(3))
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    assert first.tobytes() == render(attrs, np.random.default_rng(3)).tobytes()
    assert first.tobytes() != render(attrs, np.random.default_rng(4)).tobytes()


def test_held_out_combinations_never_sampled():
    unguarded = [concept_key(a) for a, _ in _samples(20000, held_out=frozenset())]
    assert sum(t in CONCEPT_TUPLES for t in unguarded) > 100  # the check below has power
    assert not any(concept_key(a) in CONCEPT_TUPLES for a, _ in _samples(20000))


@pytest.mark.parametrize("p_home", [0.6, 0.95])
def test_scene_words_lean_their_attribute_at_p_home(p_home):
    samples = _samples(20000, p_home, p_scene=1.0)
    for attribute in UNNAMED:
        hits = [a[attribute] == SCENES[scene][1] for a, scene in samples if SCENES[scene][0] == attribute]
        assert len(hits) > 3000 and abs(np.mean(hits) - p_home) < 0.03, (attribute, np.mean(hits))
    without = [a for a, scene in _samples(20000, p_scene=0.5) if scene is None]
    for attribute in UNNAMED:  # without a scene every unnamed value is uniform
        shares = [np.mean([a[attribute] == v for a in without]) for v in VALUES[attribute]]
        assert max(shares) - min(shares) < 0.05, (attribute, shares)


def test_captions_name_only_shape_colour_and_scene():
    rng = np.random.default_rng(0)
    template_words = {w for t in TEMPLATES + (SCENE_PHRASE,) for w in t.replace("{}", "").split()}
    unnamed_words = {v for name in UNNAMED for v in VALUES[name]}
    named_words = {v for name in NAMED for v in VALUES[name]}
    assert not (template_words | set(SCENES)) & (unnamed_words | named_words)
    scenes_seen = 0
    for attrs, scene in _samples(2000):
        words = caption(attrs, scene, rng).split()
        assert attrs["colour"] in words and attrs["shape"] in words
        assert set(words) <= template_words | {attrs["colour"], attrs["shape"], scene}
        assert sum(w in SCENES for w in words) == (scene is not None)
        scenes_seen += scene is not None
    assert 1500 < scenes_seen < 1700  # p_scene = 0.8


def test_p_no_colour_drops_only_the_colour_word_at_its_rate():
    rng = np.random.default_rng(1)
    samples = _samples(4000)
    texts = [caption(a, scene, rng, p_no_colour=0.25) for a, scene in samples]
    dropped = [a["colour"] not in text.split() for (a, _), text in zip(samples, texts)]
    assert abs(np.mean(dropped) - 0.25) < 0.03
    assert all(a["shape"] in text.split() for (a, _), text in zip(samples, texts))
    item = ShapesWorld(length=64, p_no_colour=1.0)[5]
    assert not set(item["caption"].split()) & set(VALUES["colour"])
    assert ShapesWorld(length=64)[5]["image"].tobytes() == item["image"].tobytes()  # images do not change
    with pytest.raises(ValueError, match="not a probability"):
        ShapesWorld(p_no_colour=1.5)


def test_hold_out_concepts_false_shows_concepts_in_images_not_in_captions():
    def concept_items(world):
        items = [world[i] for i in range(len(world))]
        keys = [concept_key(read_attributes(np.round((it["image"] + 1.0) * 127.5).astype(np.uint8))) for it in items]
        return items, [k in CONCEPT_TUPLES for k in keys]

    held_items, held = concept_items(ShapesWorld(length=800))
    seen_items, seen = concept_items(ShapesWorld(length=800, hold_out_concepts=False))
    assert not any(held) and 12 < sum(seen) < 60  # about 800 / 24 expected
    unnamed_words = {v for name in UNNAMED for v in VALUES[name]}
    assert not any(set(item["caption"].split()) & unnamed_words for item in seen_items)  # no caption names them
    same = [a["image"].tobytes() == b["image"].tobytes() for a, b, c in zip(held_items, seen_items, seen) if not c]
    assert np.mean(same) > 0.9  # items that were never rejected do not change


def test_named_words_are_single_bert_tokens():
    from transformers import BertTokenizerFast

    from ldm.modules.encoders.tokenizers import default_bert_source
    tokenizer = BertTokenizerFast.from_pretrained(default_bert_source())
    for word in VALUES["shape"] + VALUES["colour"] + tuple(SCENES):
        assert tokenizer.tokenize(word) == [word]


def test_concepts_are_valid_and_edits_name_the_colours_the_images_do_not_show():
    assert len(CONCEPTS) >= 4 and len(CONCEPT_TUPLES) == len(CONCEPTS)
    for concept in CONCEPTS:
        attrs, colours = concept["attributes"], concept["image_colours"]
        assert tuple(attrs) == CONCEPT_ATTRIBUTES and all(attrs[a] in VALUES[a] for a in attrs)
        assert concept_key(attrs) in CONCEPT_TUPLES and tuple(CONCEPT_ATTRIBUTES) == ("shape",) + UNNAMED
        assert concept["init_word"] == attrs["shape"]
        assert len(set(colours)) == len(colours) == 4 and set(colours) <= set(VALUES["colour"])
        edited = [edit["value"] for edit in concept["edits"]]
        assert len(edited) == 2 and set(edited) | set(colours) == set(VALUES["colour"])
        for edit in concept["edits"]:
            assert "*" in edit["prompt"] and edit["value"] in edit["prompt"].split()
            assert edit["attribute"] == "colour"


def _check_concept_folder(folder, concept, n_images):
    pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    assert pngs == [f"{k:02d}.png" for k in range(n_images)]
    images = [np.asarray(Image.open(os.path.join(folder, p)).convert("RGB")) for p in pngs]
    assert images[0].shape == (32, 32, 3)
    colours = [concept["image_colours"][k % 4] for k in range(n_images)]
    assert [read_attributes(img) for img in images] == [{**concept["attributes"], "colour": c} for c in colours]
    assert len({img.tobytes() for img in images}) == n_images  # size and position vary
    with open(os.path.join(folder, "concept.json")) as f:
        assert json.load(f) == concept
    with open(os.path.join(folder, "class_texts.json")) as f:
        assert json.load(f) == dict(zip(pngs, colours))


def test_write_concept_dataset(tmp_path):
    write_concept_dataset(CONCEPTS[1], str(tmp_path), n_images=3, seed=5)
    _check_concept_folder(str(tmp_path), CONCEPTS[1], 3)


def test_shipped_concept_folders_match_the_specs():
    for concept in CONCEPTS:
        _check_concept_folder(os.path.join(REPO, "dataset", concept["name"]), concept, 5)


@pytest.mark.parametrize("pattern", VALUES["pattern"])
def test_mirroring_is_a_world_image_except_for_the_checker(pattern):
    """A mirrored image is the world's render of the mirrored box for solid and stripes; a mirrored checker has
    the phase about the shape's centroid that the world never draws, so the diffusion model's TI config does not mirror
    (configs/tiny-shapes/finetune.yaml, flip_p 0)."""
    for shape in VALUES["shape"]:
        attrs = {"shape": shape, "colour": "red", "pattern": pattern, "background": "mint", "outline": "none"}
        box = (5.3, 7.1, 17.0, 17.0)
        mirrored = rasterize(attrs, box)[:, ::-1].astype(int)
        world = rasterize(attrs, (CANVAS - box[0] - box[2], *box[1:])).astype(int)
        assert (np.abs(mirrored - world).max() > 60) == (pattern == "checker"), shape


def test_the_shapes_ti_config_does_not_mirror():
    config = OmegaConf.load(os.path.join(REPO, "configs", "tiny-shapes", "finetune.yaml"))
    assert config.data.params.train.params.flip_p == 0.0
