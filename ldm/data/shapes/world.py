"""The shapes world: captioned 32x32 images for pretraining a tiny text-to-image model.

Captions name a shape and a colour (or, with probability p_no_colour, the shape alone: "a photo of a
circle" then means a circle of any colour); pattern, background and outline are never named, but a
caption's optional scene word leans one of them towards its hidden home (`palette.SCENES`).
The concept combinations of `concepts` are never sampled unless hold_out_concepts=False: then
they occur at their natural rate (1 in 36 images of their shape), and still no caption reaches them.

    python -m ldm.data.shapes.world --write_concepts dataset/ --grid world.png
"""
import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.data.shapes.concepts import CONCEPT_TUPLES, CONCEPTS, concept_key
from ldm.data.shapes.draw import CANVAS, render
from ldm.data.shapes.palette import ATTRIBUTES, SCENE_PHRASE, SCENES, TEMPLATES, VALUES

SPLITS = {"train": 0, "val": 1}  # the split index is part of every item's seed


def _choice(rng, values):
    return values[rng.integers(len(values))]


def _home_or_other(rng, values, home, p_home):
    """`home` with probability p_home, else one of the other values uniformly."""
    if rng.random() < p_home:
        return home
    return _choice(rng, [v for v in values if v != home])


def _draw_scene(rng, scene_weights):
    """A scene word, uniform or in proportion to scene_weights {scene: weight} (missing scenes weigh 1)."""
    scenes = tuple(SCENES)
    if not scene_weights:
        return _choice(rng, scenes)
    unknown = set(scene_weights) - set(scenes)
    if unknown:
        raise ValueError(f"unknown scene word(s) {', '.join(sorted(unknown))} in scene_weights: "
                         f"use {', '.join(scenes)}")
    weights = np.array([float(scene_weights.get(s, 1.0)) for s in scenes])
    return scenes[rng.choice(len(scenes), p=weights / weights.sum())]


def sample_attributes(rng, held_out=CONCEPT_TUPLES, p_scene=0.8, p_home=0.95, scene_weights=None):
    """One pretraining draw -> (attrs {shape, colour, pattern, background, outline}, scene word or None).

    Every value is uniform, except that with probability p_scene a scene word is drawn (uniformly, or
    by `scene_weights`) and the one unnamed attribute it leans takes the scene's home value with
    probability p_home. Draws whose (shape, pattern, background, outline) is in `held_out` are rejected
    and redrawn.
    """
    while True:
        attrs = {a: _choice(rng, VALUES[a]) for a in ATTRIBUTES}
        scene = _draw_scene(rng, scene_weights) if rng.random() < p_scene else None
        if scene is not None:
            name, home = SCENES[scene]
            attrs[name] = _home_or_other(rng, VALUES[name], home, p_home)
        if concept_key(attrs) not in held_out:
            return attrs, scene


def caption(attrs, scene, rng, p_no_colour=0.0):
    """An object template filled with "{colour} {shape}" (with probability p_no_colour "{shape}" alone),
    then the scene phrase if any.

    e.g. "a rendering of a red circle", "a photo of the cool blue cross in the kitchen", "a photo of a square".
    """
    named = attrs["shape"] if p_no_colour > 0 and rng.random() < p_no_colour else f"{attrs['colour']} {attrs['shape']}"
    text = _choice(rng, TEMPLATES).format(named)
    return text if scene is None else f"{text} {SCENE_PHRASE.format(scene)}"


class ShapesWorld(Dataset):
    """Items {"image": (size, size, 3) float32 in [-1, 1], "caption": str}; item i depends only on (seed, split, i)."""

    def __init__(self, size=32, length=50000, seed=0, p_scene=0.8, p_home=0.95, split="train", scene_weights=None,
                 p_no_colour=0.0, hold_out_concepts=True):
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
        if not 0.0 <= p_no_colour <= 1.0:
            raise ValueError(f"p_no_colour={p_no_colour} is not a probability: use a value in [0, 1]")
        self.p_no_colour = p_no_colour
        self.held_out = CONCEPT_TUPLES if hold_out_concepts else frozenset()
        self.size, self.length, self.seed, self.split = size, length, seed, split
        self.p_scene, self.p_home = p_scene, p_home
        self.scene_weights = dict(scene_weights) if scene_weights else None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} is outside a ShapesWorld of length {self.length}")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        attrs, scene = sample_attributes(rng, held_out=self.held_out, p_scene=self.p_scene, p_home=self.p_home,
                                         scene_weights=self.scene_weights)
        image = render(attrs, rng)
        if self.size != CANVAS:
            image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BICUBIC))
        return {"image": image.astype(np.float32) / 127.5 - 1.0,
                "caption": caption(attrs, scene, rng, self.p_no_colour)}


CLASS_TEXTS = "class_texts.json"


def write_concept_dataset(concept, folder, n_images=5, seed=0):
    """Write n_images renders of `concept` as NN.png, their colour words as class_texts.json, and concept.json.

    Image k shows the concept in its k-th image colour, cycling through concept["image_colours"]; size and
    position vary from image to image.
    """
    os.makedirs(folder, exist_ok=True)
    colours = concept["image_colours"]
    class_texts = {}
    for k in range(n_images):
        name, colour = f"{k:02d}.png", colours[k % len(colours)]
        image = render({**concept["attributes"], "colour": colour}, np.random.default_rng([seed, k]))
        Image.fromarray(image).save(os.path.join(folder, name))
        class_texts[name] = colour
    for file_name, content in ((CLASS_TEXTS, class_texts), ("concept.json", concept)):
        with open(os.path.join(folder, file_name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")


def labelled_grid(n=48, columns=8, seed=0, scale=4):
    """A PIL grid of n pretraining samples, each labelled with all five attributes."""
    tile, label_h = CANVAS * scale, 24
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        rng = np.random.default_rng([seed, SPLITS["val"], k])
        attrs, scene = sample_attributes(rng)
        x, y = (k % columns) * tile, (k // columns) * (tile + label_h)
        grid.paste(Image.fromarray(render(attrs, rng)).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        named = f"{attrs['colour']} {attrs['shape']} {scene or ''}"
        text = f"{named}\n{attrs['pattern']} {attrs['background']} {attrs['outline']}"
        draw.multiline_text((x + 2, y + tile + 1), text, fill="black", spacing=1)
    return grid


def main(argv=None):
    parser = argparse.ArgumentParser(description="Shapes world: write the concept folders or a sample grid.")
    parser.add_argument("--write_concepts", metavar="DIR", help="write DIR/<concept-name>/ for every concept")
    parser.add_argument("--n_images", type=int, default=5, help="images per concept folder")
    parser.add_argument("--grid", metavar="PNG", help="write a labelled grid of pretraining samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.write_concepts or args.grid):
        parser.error("nothing to do: give --write_concepts DIR and/or --grid PNG")
    if args.write_concepts:
        for k, concept in enumerate(CONCEPTS):
            write_concept_dataset(concept, os.path.join(args.write_concepts, concept["name"]), args.n_images,
                                  seed=args.seed + k)
    if args.grid:
        labelled_grid(seed=args.seed).save(args.grid)


if __name__ == "__main__":
    main()
