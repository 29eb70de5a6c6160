"""Textual-inversion scores for shapes-world concepts, read analytically from generated pixels.

Fidelity: share of "a photo of a *" samples showing every attribute of the concept. Editability:
share of edit-prompt samples showing the edited value while keeping the concept's attributes. The baseline
replaces `*` by the concept's init word. check/concept_eval.py scores a folder of samples with them.
"""
import json
import os

import numpy as np

from ldm.cli import UsageError, one_line
from ldm.data.shapes.readers import read_attributes

PLACEHOLDER = "*"
FIDELITY_PROMPT = "a photo of a *"
# What every concept.json holds (ldm.data.shapes.world writes it).
SPEC_KEYS = ("name", "init_word", "attributes", "edits")


def read_spec(path):
    """A concept.json -> its dict; a missing file, invalid JSON or a missing key -> one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"concept spec not found: {path} (give a dataset/<concept>/concept.json)")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except ValueError as e:  # invalid JSON or not UTF-8
        raise UsageError(f"concept spec {path} is not valid JSON ({one_line(e)}): fix or regenerate it") from e
    missing = [k for k in SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise UsageError(f"concept spec {path} has no {', '.join(missing)}: a concept.json holds "
                         f"{', '.join(SPEC_KEYS)} (regenerate it with ldm.data.shapes.world)")
    return spec


def _read_all(images):
    """images: list of (H, W, 3) uint8 -> list of attribute dicts; at least one image is required."""
    if len(images) == 0:
        raise ValueError("no images to score: the generator or folder returned none")
    return [read_attributes(np.asarray(img)) for img in images]


def _share_matching(reads, expected):
    return float(np.mean([all(r[a] == v for a, v in expected.items()) for r in reads]))


def per_attribute_match(images, spec):
    """{attribute: share of images whose read value equals the concept's}, for the concept's attributes."""
    reads = _read_all(images)
    return {a: _share_matching(reads, {a: v}) for a, v in spec["attributes"].items()}


def concept_fidelity(images, spec):
    """Share of images showing every attribute of the concept."""
    return _share_matching(_read_all(images), spec["attributes"])


def edit_success(images, spec, edit):
    """Share of images showing edit["attribute"] = edit["value"] and the concept's other attributes."""
    expected = {**spec["attributes"], edit["attribute"]: edit["value"]}
    return _share_matching(_read_all(images), expected)


def evaluate_word(generate, spec, word, n, image_score=None):
    """Scores of the prompts with `*` replaced by word; generate(prompt, n) -> list of (H, W, 3) uint8."""
    images = generate(FIDELITY_PROMPT.replace(PLACEHOLDER, word), n)
    edits = {e["prompt"]: edit_success(generate(e["prompt"].replace(PLACEHOLDER, word), n), spec, e)
             for e in spec["edits"]}
    scores = {
        "word": word,
        "fidelity": concept_fidelity(images, spec),
        "editability": float(np.mean(list(edits.values()))) if edits else float("nan"),
        "per_attribute": per_attribute_match(images, spec),
        "edits": edits,
    }
    if image_score is not None:
        scores["image_similarity"] = image_score(images)
    return scores


def evaluate_concept(generate, spec, n=64, baseline=True, image_score=None):
    """{"concept": name, "pseudo_word": scores, "init_word": scores (with baseline)}.

    scores = {word, fidelity, editability (mean over edits), per_attribute, edits {prompt: share}};
    generate(prompt: str, n: int) -> list of (H, W, 3) uint8 is the caller's sampler. With
    image_score(images) -> float (e.g. CLIP similarity to the concept's images), scores also hold
    "image_similarity" of the "a photo of a *" samples.
    """
    result = {"concept": spec["name"],
              "pseudo_word": evaluate_word(generate, spec, PLACEHOLDER, n, image_score)}
    if baseline:
        result["init_word"] = evaluate_word(generate, spec, spec["init_word"], n, image_score)
    return result


def evaluation_rows(evaluation):
    """Flat table rows (concept, word, fidelity, editability, one column per attribute) of evaluate_concept's result."""
    rows = []
    for key in ("pseudo_word", "init_word"):
        if key in evaluation:
            scores = evaluation[key]
            rows.append({"concept": evaluation["concept"], "word": scores["word"], "fidelity": scores["fidelity"],
                         "editability": scores["editability"], **scores["per_attribute"]})
    return rows


def _cell(value):
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(rows):
    """Markdown table of rows (dicts sharing the first row's keys); floats to three decimals."""
    if not rows:
        raise ValueError("format_table needs at least one row")
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
