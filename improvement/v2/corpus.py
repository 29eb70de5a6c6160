"""The Korean–English pair corpus of improvement v2: the TI templates and the shapes world's vocabulary.

Every English template of `ldm.data.shapes.palette.TEMPLATES`, colour, shape and scene phrase has a
hand-written Korean counterpart below. Korean puts the object before its genitive ("빨간 원의 사진",
"red circle's photo") and the scene before the object ("부엌에 있는 빨간 원", "red circle that is in
the kitchen"); articles have no Korean word, so "the" is rendered by 그 where it tells templates apart.
The placeholder `*` passes through unchanged ("*의 사진" ↔ "a photo of a *").

    python -m improvement.v2.corpus --out dataset/ko_en/pairs.tsv     # (re)write the shipped corpus
"""
import argparse
import os

import numpy as np

from ldm.data.shapes.palette import COLOURS, SCENE_PHRASE, SCENES, SHAPES, TEMPLATES
from ldm.util import atomic_path

PLACEHOLDER = "*"

# English template -> Korean template; {} is the object phrase in both.
KO_TEMPLATES = {
    "a photo of a {}": "{}의 사진",
    "a rendering of a {}": "{}의 렌더링",
    "a cropped photo of the {}": "그 {}의 잘린 사진",
    "the photo of a {}": "{}의 그 사진",
    "a photo of my {}": "내 {}의 사진",
    "a photo of the cool {}": "그 멋진 {}의 사진",
    "a close-up photo of a {}": "{}의 클로즈업 사진",
    "a cropped photo of a {}": "{}의 잘린 사진",
    "a photo of the {}": "그 {}의 사진",
    "a good photo of the {}": "그 {}의 좋은 사진",
    "a photo of one {}": "{} 하나의 사진",
    "a close-up photo of the {}": "그 {}의 클로즈업 사진",
    "a rendition of the {}": "그 {}의 표현",
    "a rendition of a {}": "{}의 표현",
    "a photo of a nice {}": "근사한 {}의 사진",
    "a good photo of a {}": "{}의 좋은 사진",
    "a photo of the nice {}": "그 근사한 {}의 사진",
    "a photo of the weird {}": "그 이상한 {}의 사진",
    "a photo of a cool {}": "멋진 {}의 사진",
}
KO_COLOURS = {"red": "빨간", "orange": "주황색", "yellow": "노란", "green": "초록색", "blue": "파란",
              "purple": "보라색"}
KO_SHAPES = {"circle": "원", "square": "정사각형", "triangle": "삼각형", "cross": "십자가"}
KO_SCENES = {"desert": "사막", "harbor": "항구", "kitchen": "부엌", "station": "역", "market": "시장",
             "garden": "정원", "temple": "사원", "library": "도서관", "museum": "박물관", "studio": "스튜디오"}
KO_SCENE_PHRASE = "{}에 있는 {}"  # scene, object

HELD_OUT_SHARE = 0.2
SPLIT_SEED = 0


def english(template, colour, shape, scene):
    """The world's caption: colour may be None ("a photo of a *"), shape may be the placeholder."""
    obj = shape if colour is None else f"{colour} {shape}"
    text = template.format(obj)
    return text if scene is None else f"{text} {SCENE_PHRASE.format(scene)}"


def korean(template, colour, shape, scene):
    """The Korean counterpart of `english(...)` with the same arguments."""
    obj = KO_SHAPES.get(shape, shape)
    if colour is not None:
        obj = f"{KO_COLOURS[colour]} {obj}"
    if scene is not None:
        obj = KO_SCENE_PHRASE.format(KO_SCENES[scene], obj)
    return KO_TEMPLATES[template].format(obj)


def _objects():
    """(colour or None, shape or '*') of every object phrase: 24 coloured shapes, 4 bare shapes (the init-word
    prompts), '*' and 6 coloured '*'."""
    shapes = [(c, s) for s in SHAPES for c in COLOURS] + [(None, s) for s in SHAPES]
    return shapes + [(None, PLACEHOLDER)] + [(c, PLACEHOLDER) for c in COLOURS]


def build_pairs(seed=SPLIT_SEED, held_out_share=HELD_OUT_SHARE):
    """-> list of (korean, english, split): every (template, object) once without a scene and once with a
    scene drawn for it, plus the empty prompt; split is "train" or "heldout".

    Held-out pairs are drawn among the shape ones, so every word still occurs in training: what is held
    out is the combination.
    """
    rng = np.random.default_rng(seed)
    scenes = list(SCENES)
    pairs = [("", "", "train")]
    for template in TEMPLATES:
        for colour, shape in _objects():
            for scene in (None, scenes[rng.integers(len(scenes))]):
                held = shape != PLACEHOLDER and rng.random() < held_out_share
                pairs.append((korean(template, colour, shape, scene), english(template, colour, shape, scene),
                              "heldout" if held else "train"))
    return pairs


def write_pairs(path, pairs):
    """Tab-separated `korean<TAB>english<TAB>split`, one pair per line, with a header."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("korean\tenglish\tsplit\n")
        f.writelines(f"{ko}\t{en}\t{split}\n" for ko, en, split in pairs)


def read_pairs(path, split=None):
    """-> list of (korean, english) from a file of `write_pairs`, all or those of `split`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no pair corpus at '{path}': "
                                f"write it with `python -m improvement.v2.corpus --out {path}`")
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    bad = [i + 2 for i, r in enumerate(rows) if len(r) != 3]
    if bad:
        raise ValueError(f"{path}: line {bad[0]} is not `korean<TAB>english<TAB>split`: fix or rewrite the file")
    return [(ko, en) for ko, en, s in rows if split is None or s == split]


def translate_prompt(prompt):
    """The Korean counterpart of one of the world's English prompts ("a photo of a blue *" -> "파란 *의 사진")."""
    for template in TEMPLATES:
        head, tail = template.split("{}")
        if not (prompt.startswith(head) and prompt.endswith(tail)) or len(prompt) <= len(head) + len(tail):
            continue
        obj, scene = prompt[len(head):len(prompt) - len(tail) or None], None
        for s in SCENES:
            if obj.endswith(" " + SCENE_PHRASE.format(s)):
                obj, scene = obj[:-len(SCENE_PHRASE.format(s)) - 1], s
        words = obj.split()
        if len(words) == 1 or (len(words) == 2 and words[0] in COLOURS):
            colour = words[0] if len(words) == 2 else None
            if words[-1] in SHAPES or words[-1] == PLACEHOLDER:
                return korean(template, colour, words[-1], scene)
    raise ValueError(f"'{prompt}' is not a shapes-world prompt the corpus can translate: use a template of "
                     "ldm.data.shapes.palette.TEMPLATES with '[colour] shape-or-*' and an optional scene")


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the Korean–English pair corpus of improvement v2.")
    p.add_argument("--out", default="dataset/ko_en/pairs.tsv")
    args = p.parse_args(argv)
    pairs = build_pairs()
    write_pairs(args.out, pairs)
    held = sum(s == "heldout" for *_, s in pairs)
    print(f"{args.out}: {len(pairs)} pairs ({len(pairs) - held} train, {held} held out)")


if __name__ == "__main__":
    main()
