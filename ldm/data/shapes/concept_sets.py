"""The shapes world's concepts beyond the shipped six: a tuning set and a held-out set.

Defaults are chosen on TUNING only; HELDOUT is scored once the defaults are fixed. Together they use every
pattern, background and outline value (each set on its own does too), and between them the six shape x pattern
pairs that no shipped concept has (circle-stripes, square-checker and cross-solid for tuning; triangle-solid,
triangle-checker and cross-stripes held out). Unlike the shipped six (`concepts.CONCEPT_TUPLES`), these tuples
are NOT kept out of pretraining: the shipped weights have drawn each of them at its natural rate (1 in 36
images of its shape, in every colour), always under captions that name only shape and colour, so no word
reaches a combination and `*` still has to find it (docs/shapes-world.md#concept-sets).

    python -m ldm.data.shapes.concept_sets dataset/     # write dataset/<name>/ for every concept of both sets
"""
import argparse
import os

from ldm.data.shapes.concepts import CONCEPTS, _concept
from ldm.data.shapes.world import write_concept_dataset

TUNING = [
    _concept("striped_circle_mint", ("red", "purple"),
             shape="circle", pattern="stripes", background="mint", outline="black"),
    _concept("checker_square_lilac", ("green", "yellow"),
             shape="square", pattern="checker", background="lilac", outline="none"),
    _concept("solid_cross_slate", ("orange", "blue"),
             shape="cross", pattern="solid", background="slate", outline="white"),
    _concept("checker_circle_sand", ("blue", "orange"),
             shape="circle", pattern="checker", background="sand", outline="none"),
    _concept("striped_square_sand", ("yellow", "red"),
             shape="square", pattern="stripes", background="sand", outline="white"),
    _concept("solid_circle_lilac", ("green", "blue"),
             shape="circle", pattern="solid", background="lilac", outline="black"),
]

HELDOUT = [
    _concept("solid_triangle_sand", ("blue", "purple"),
             shape="triangle", pattern="solid", background="sand", outline="black"),
    _concept("checker_triangle_mint", ("red", "orange"),
             shape="triangle", pattern="checker", background="mint", outline="none"),
    _concept("striped_cross_lilac", ("green", "yellow"),
             shape="cross", pattern="stripes", background="lilac", outline="white"),
    _concept("checker_cross_slate", ("purple", "yellow"),
             shape="cross", pattern="checker", background="slate", outline="none"),
    _concept("striped_triangle_sand", ("blue", "orange"),
             shape="triangle", pattern="stripes", background="sand", outline="none"),
    _concept("solid_circle_mint", ("red", "yellow"),
             shape="circle", pattern="solid", background="mint", outline="white"),
]

# set name -> its concepts; "shipped" is the six kept out of pretraining (concepts.CONCEPTS)
CONCEPT_SETS = {"shipped": CONCEPTS, "tuning": TUNING, "heldout": HELDOUT}
SEED_OFFSET = {"tuning": 100, "heldout": 200}  # write_concept_dataset seeds: seed + offset + index


def set_names(name):
    """The concept names of set `name` (a key of CONCEPT_SETS)."""
    return [c["name"] for c in CONCEPT_SETS[name]]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write dataset/<name>/ for every tuning and held-out concept.")
    parser.add_argument("folder", help="parent folder of the concept folders (dataset/)")
    parser.add_argument("--n_images", type=int, default=5, help="images per concept folder")
    args = parser.parse_args(argv)
    for set_name, offset in SEED_OFFSET.items():
        for k, concept in enumerate(CONCEPT_SETS[set_name]):
            write_concept_dataset(concept, os.path.join(args.folder, concept["name"]), args.n_images, seed=offset + k)


if __name__ == "__main__":
    main()
