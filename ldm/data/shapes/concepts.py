"""Held-out concepts of the shapes world: a shape with its own pattern, background and outline.

No pretraining image shows a concept's (shape, pattern, background, outline) in any colour, and no
caption leans more than one unnamed attribute, so the pseudo-word `*` has to find the combination.
A concept's images show it in four colours and each image's caption names its colour ("a photo of a
green *", `class_texts.json` beside the images): the colour is explained by a word the model knows, so
the vectors learn only what no word names. (With one colour and no colour word, the vectors took the
colour too, and "a photo of a blue *" stayed red; with several colours and no colour word, the colour
was most of the loss and the vectors learned nothing else.) The init word is the shape name (the coarse
class word of the original method); the edits name the two colours the images do not show and expect
the rest of the concept to stay.
"""
from ldm.data.shapes.palette import UNNAMED, VALUES

CONCEPT_ATTRIBUTES = ("shape",) + UNNAMED


def concept_key(attrs):
    """The tuple of `attrs` that identifies a concept in every colour: (shape, pattern, background, outline)."""
    return tuple(attrs[a] for a in CONCEPT_ATTRIBUTES)


def _concept(name, edit_colours, **attributes):
    edits = [{"prompt": f"a photo of a {c} *", "attribute": "colour", "value": c} for c in edit_colours]
    image_colours = [c for c in VALUES["colour"] if c not in edit_colours]
    return {"name": name, "init_word": attributes["shape"], "attributes": attributes,
            "image_colours": image_colours, "edits": edits}


CONCEPTS = [
    _concept("checker_circle", ("blue", "yellow"),
             shape="circle", pattern="checker", background="slate", outline="black"),
    _concept("striped_triangle", ("red", "green"),
             shape="triangle", pattern="stripes", background="lilac", outline="white"),
    _concept("solid_square", ("orange", "purple"),
             shape="square", pattern="solid", background="mint", outline="black"),
    _concept("checker_cross", ("blue", "red"),
             shape="cross", pattern="checker", background="sand", outline="white"),
    _concept("striped_square", ("green", "orange"),
             shape="square", pattern="stripes", background="slate", outline="none"),
    _concept("solid_circle", ("purple", "green"),
             shape="circle", pattern="solid", background="sand", outline="none"),
]

CONCEPT_TUPLES = frozenset(concept_key(c["attributes"]) for c in CONCEPTS)
