"""The shape reader agrees with shapes labelled by eye on the shipped model's samples (tests/fixtures/shape_samples)."""
import collections
import json
import os

import numpy as np
from PIL import Image

from ldm.data.shapes.palette import SHAPES
from ldm.data.shapes.readers import UNKNOWN, read_attributes

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "shape_samples")


def _fixture():
    """-> (labels: list of dicts, reads: list of str), "none" where the reader says UNKNOWN."""
    spec = json.load(open(os.path.join(FOLDER, "labels.json"), encoding="utf-8"))
    grid = np.asarray(Image.open(os.path.join(FOLDER, "samples.png")).convert("RGB"))
    t, cols = spec["tile"], spec["columns"]
    tiles = [grid[k // cols * t:(k // cols + 1) * t, k % cols * t:(k % cols + 1) * t]
             for k in range(len(spec["labels"]))]
    reads = [read_attributes(tile)["shape"] for tile in tiles]
    return spec["labels"], ["none" if r == UNKNOWN else r for r in reads]


def confusion(labels, reads):
    """Counter {(label, read): count} over the labels marked sure."""
    return collections.Counter((row["shape"], r) for row, r in zip(labels, reads) if row["sure"])


def test_fixture_covers_every_shape_and_true_misses():
    labels, _ = _fixture()
    sure = collections.Counter(row["shape"] for row in labels if row["sure"])
    assert set(sure) == {*SHAPES, "none"} and min(sure.values()) >= 8, sure


def test_shape_reader_agrees_with_sure_hand_labels():
    labels, reads = _fixture()
    table = confusion(labels, reads)
    agree = sum(n for (label, read), n in table.items() if label == read) / sum(table.values())
    assert agree >= 0.95, sorted(table.items())
    assert all(read == label for (label, read) in table if label != "none"), sorted(table.items())  # no false miss
    assert table[("none", "none")] >= 0.5 * sum(n for (label, _), n in table.items() if label == "none")
