"""Pixel readers recover every attribute, and the concept scores count what they should."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from check.concept_eval import main
from ldm.data.mask_ops import erode, erode_round, fill_holes, label_components, largest_component
from ldm.data.shapes.concepts import CONCEPTS
from ldm.data.shapes.palette import ATTRIBUTES, BACKGROUNDS, VALUES
from ldm.data.shapes.readers import read_attributes
from ldm.data.shapes.scores import (
    concept_fidelity,
    edit_success,
    evaluate_concept,
    evaluation_rows,
    format_table,
    per_attribute_match,
)
from ldm.data.shapes.world import render, sample_attributes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = CONCEPTS[0]  # checker circle, black outline, slate background, in any colour
RED = {**SPEC["attributes"], "colour": "red"}


def _blur(x, sigma):
    """Separable Gaussian blur of x: (H, W, 3) float, edges replicated."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(3)]
        p = np.pad(x, pad, mode="edge")
        x = sum(w * np.take(p, np.arange(i, i + x.shape[axis]), axis=axis) for i, w in enumerate(k))
    return x


def _degrade(img, rng):
    """Mimic a generated sample: blur sigma 0.6, noise std 6/255, a colour shift of up to 8/255, JPEG q90."""
    x = _blur(img.astype(float), 0.6) + rng.normal(0, 6, img.shape) + rng.uniform(-8, 8, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return np.asarray(Image.open(buf).convert("RGB"))


def _all_correct_share(n, degrade):
    hits = []
    for i in range(n):
        rng = np.random.default_rng([11, i])
        attrs, _ = sample_attributes(rng, held_out=frozenset())
        img = render(attrs, rng)
        hits.append(read_attributes(_degrade(img, rng) if degrade else img) == attrs)
    return np.mean(hits)


def test_readers_recover_clean_images():
    assert _all_correct_share(500, degrade=False) >= 0.99


def test_readers_survive_mild_degradation():
    assert _all_correct_share(500, degrade=True) >= 0.95


def test_outline_reader_is_not_fooled_by_dark_bands_at_the_edge(monkeypatch):
    """The model draws a pattern's dark phase darker than the palette: a dark band along an edge is no outline."""
    import ldm.data.shapes.draw as draw

    monkeypatch.setattr(draw, "DARK_PHASE", 0.3)  # the palette's is 0.5
    right = []
    for i in range(300):
        rng = np.random.default_rng([12, i])
        attrs, _ = sample_attributes(rng, held_out=frozenset())
        if attrs["pattern"] != "solid":
            right.append(read_attributes(render(attrs, rng))["outline"] == attrs["outline"])
    assert len(right) > 150 and np.mean(right) >= 0.95


def test_outline_reader_agrees_with_hand_labels_on_model_samples():
    """108 samples of the shipped model, outline labelled by eye (tests/fixtures/outline_samples)."""
    folder = os.path.join(REPO, "tests", "fixtures", "outline_samples")
    spec = json.load(open(os.path.join(folder, "labels.json")))
    grid, t, cols = (np.asarray(Image.open(os.path.join(folder, "samples.png")).convert("RGB")),
                     spec["tile"], spec["columns"])
    read = [read_attributes(grid[k // cols * t:(k // cols + 1) * t, k % cols * t:(k % cols + 1) * t])["outline"]
            for k in range(len(spec["labels"]))]
    agree = [r == row["outline"] for r, row in zip(read, spec["labels"])]
    assert {row["outline"] for row in spec["labels"]} == {"none", "white", "black"}
    assert np.mean(agree) >= 0.97, [(k, r) for k, (r, a) in enumerate(zip(read, agree)) if not a]


def test_readers_say_unknown_without_an_object():
    plain = np.broadcast_to(np.asarray(BACKGROUNDS["sand"], np.uint8), (32, 32, 3)).copy()
    assert read_attributes(plain) == dict.fromkeys(ATTRIBUTES, "unknown") | {"background": "sand"}
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert read_attributes(noise)["background"] == "unknown"


def test_readers_accept_other_sizes():
    img = render(RED, np.random.default_rng(0))
    big = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC))
    assert read_attributes(big) == RED
    with pytest.raises(ValueError, match="uint8"):
        read_attributes(img.astype(np.float32))


def _renders(attrs, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [render(attrs, rng) for _ in range(n)]


def test_scores_on_hand_made_cases():
    right = _renders(RED)
    wrong_background = _renders({**RED, "background": "mint"})
    edit = SPEC["edits"][0]
    edited = _renders({**RED, edit["attribute"]: edit["value"]})
    assert concept_fidelity(right, SPEC) == 1.0 and concept_fidelity(wrong_background, SPEC) == 0.0
    assert per_attribute_match(wrong_background, SPEC) == dict.fromkeys(SPEC["attributes"], 1.0) | {"background": 0.0}
    assert "colour" not in per_attribute_match(right, SPEC)  # the concept holds in every colour
    assert concept_fidelity(right + wrong_background, SPEC) == 0.5
    assert edit_success(edited, SPEC, edit) == 1.0 and concept_fidelity(edited, SPEC) == 1.0
    assert edit_success(right, SPEC, edit) == 0.0
    edited_wrong_background = _renders({**RED, edit["attribute"]: edit["value"], "background": "mint"})
    assert edit_success(edited_wrong_background, SPEC, edit) == 0.0
    with pytest.raises(ValueError, match="no images"):
        concept_fidelity([], SPEC)


def _fake_generate(prompts):
    """A sampler that gets `*` right and gives the init word other unnamed values; records the prompts."""
    def generate(prompt, n):
        prompts.append(prompt)
        words = prompt.split()
        attrs = {**RED, "colour": words[-2]} if words[-2] in VALUES["colour"] else dict(RED)
        if words[-1] != "*":
            attrs.update(pattern="solid", background="mint", outline="none")
        return _renders(attrs, n)
    return generate


def test_evaluate_concept_with_a_fake_sampler():
    prompts = []
    result = evaluate_concept(_fake_generate(prompts), SPEC, n=3)
    assert prompts == ["a photo of a *", "a photo of a blue *", "a photo of a yellow *",
                       "a photo of a circle", "a photo of a blue circle", "a photo of a yellow circle"]
    star, init = result["pseudo_word"], result["init_word"]
    assert (star["word"], star["fidelity"], star["editability"]) == ("*", 1.0, 1.0)
    assert (init["word"], init["fidelity"], init["editability"]) == ("circle", 0.0, 0.0)
    assert init["per_attribute"]["shape"] == 1.0 and init["per_attribute"]["background"] == 0.0
    assert "init_word" not in evaluate_concept(_fake_generate([]), SPEC, n=1, baseline=False)
    table = format_table(evaluation_rows(result)).splitlines()
    assert len(table) == 4 and table[0].startswith("| concept | word | fidelity | editability | shape")
    assert table[2].startswith(f"| {SPEC['name']} | * | 1.000 | 1.000 |")


def test_shipped_concept_images_score_full_fidelity():
    for concept in CONCEPTS:
        folder = os.path.join(REPO, "dataset", concept["name"])
        images = [np.asarray(Image.open(os.path.join(folder, p)).convert("RGB"))
                  for p in sorted(os.listdir(folder)) if p.endswith(".png")]
        assert concept_fidelity(images, concept) == 1.0, concept["name"]


def test_cli_scores_a_folder(tmp_path, capsys):
    for k, img in enumerate(_renders(RED, n=2)):
        Image.fromarray(img).save(tmp_path / f"{k}.png")
    spec_path = os.path.join(REPO, "dataset", SPEC["name"], "concept.json")
    main(["--images", str(tmp_path), "--spec", spec_path, "--edit", SPEC["edits"][0]["prompt"]])
    lines = capsys.readouterr().out.splitlines()
    header = "| concept | images | edit_success | fidelity | shape | pattern | background | outline |"
    assert lines[0] == header
    assert lines[2] == f"| {SPEC['name']} | 2 | 0.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |"


def test_mask_ops():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a hole
    mask[0, 6] = True  # a second component, touching only diagonally
    labels = label_components(mask)
    assert len(set(labels[mask].tolist())) == 2 and (labels[~mask] == 0).all()
    assert largest_component(mask).sum() == 24 and fill_holes(mask)[3, 3]
    ell = np.zeros((9, 9), bool)
    ell[1:8, 1:4] = ell[5:8, 1:8] = True  # an L; (4, 4) is off, diagonal to its inner corner
    assert erode(ell, 1)[5, 3] and not erode_round(ell, 1)[5, 3]  # the pixel diagonal to the corner


def test_tuning_and_heldout_sets_cover_the_world_and_their_folders_match(tmp_path, monkeypatch):
    """Each set uses every unnamed value, no concept repeats a shipped one (or another), the shape x pattern pairs
    the shipped six lack are all there, and each dataset/<name>/ is what write_concept_dataset writes for it."""
    from check.concept_table import load_specs
    from ldm.data.shapes.concept_sets import CONCEPT_SETS, HELDOUT, TUNING, set_names
    from ldm.data.shapes.concept_sets import main as write_sets
    from ldm.data.shapes.concepts import CONCEPT_TUPLES, concept_key

    for concepts in (TUNING, HELDOUT):
        assert len(concepts) >= 6
        for attribute in ("pattern", "background", "outline"):
            assert {c["attributes"][attribute] for c in concepts} == set(VALUES[attribute]), attribute
    keys = [concept_key(c["attributes"]) for c in TUNING + HELDOUT]
    assert len(set(keys)) == len(keys) and not set(keys) & CONCEPT_TUPLES
    pair = lambda c: (c["attributes"]["shape"], c["attributes"]["pattern"])  # noqa: E731
    missing = {(s, p) for s in VALUES["shape"] for p in VALUES["pattern"]} - {pair(c) for c in CONCEPTS}
    assert missing and missing <= {pair(c) for c in TUNING} | {pair(c) for c in HELDOUT}
    write_sets([str(tmp_path)])
    for concept in TUNING + HELDOUT:
        for name in sorted(os.listdir(tmp_path / concept["name"])):
            written = (tmp_path / concept["name"] / name).read_bytes()
            assert written == open(os.path.join(REPO, "dataset", concept["name"], name), "rb").read(), name
        images = [np.asarray(Image.open(tmp_path / concept["name"] / f"{k:02d}.png").convert("RGB")) for k in range(5)]
        assert concept_fidelity(images, concept) == 1.0, concept["name"]
    monkeypatch.chdir(REPO)
    for set_name in CONCEPT_SETS:
        assert [s["name"] for s in load_specs(None, set_name)] == sorted(set_names(set_name))
    assert [s["name"] for s in load_specs()] == sorted(c["name"] for c in CONCEPTS)  # the default: the shipped six


def test_a_copied_concept_folder_is_refused_not_scored_twice(tmp_path, monkeypatch):
    """A concept is read from dataset/<name>/ alone: a copy of its folder under another name neither doubles it in
    a set nor passes as the concept its own folder name claims."""
    from check.concept_table import load_specs
    from ldm.cli import UsageError
    from ldm.data.shapes.concept_sets import TUNING, set_names
    from ldm.data.shapes.world import write_concept_dataset

    for concept in TUNING:
        write_concept_dataset(concept, str(tmp_path / "dataset" / concept["name"]), n_images=1)
    write_concept_dataset(TUNING[0], str(tmp_path / "dataset" / "copy_of_first"), n_images=1)
    monkeypatch.chdir(tmp_path)
    assert [s["name"] for s in load_specs(None, "tuning")] == sorted(set_names("tuning"))
    with pytest.raises(UsageError, match=f"names the concept '{TUNING[0]['name']}', not 'copy_of_first'"):
        load_specs(["copy_of_first"])
    with pytest.raises(UsageError, match="no dataset/<concept>/concept.json for absent: use one of"):
        load_specs(["absent"])
