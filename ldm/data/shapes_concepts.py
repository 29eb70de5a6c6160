"""Held-out concepts of the shapes world: a coloured shape with its own pattern, background and outline.

No pretraining image shows a concept's (shape, pattern, background, outline) in any colour, and no
caption leans more than one unnamed attribute, so the pseudo-word `*` has to find the combination.
A concept has one colour, as the objects of the original method look alike in every image (a
colour that varied across the images would be most of what the embedding tries to fit: the
denoising loss of "a photo of a circle" on such images is twice that of "a photo of a red circle").
The init word is the shape name (the coarse class word of the original method); the edits name
another colour and expect the rest of the concept to stay.
"""
from ldm.data.shapes_palette import UNNAMED

CONCEPT_ATTRIBUTES = ("shape",) + UNNAMED


def concept_key(attrs):
    """The tuple of `attrs` that identifies a concept in every colour: (shape, pattern, background, outline)."""
    return tuple(attrs[a] for a in CONCEPT_ATTRIBUTES)


def _concept(name, edit_colours, **attributes):
    edits = [{"prompt": f"a photo of a {c} *", "attribute": "colour", "value": c} for c in edit_colours]
    return {"name": name, "init_word": attributes["shape"], "attributes": attributes, "edits": edits}


CONCEPTS = [
    _concept("checker_circle", ("blue", "yellow"),
             shape="circle", colour="red", pattern="checker", background="slate", outline="black"),
    _concept("striped_triangle", ("red", "green"),
             shape="triangle", colour="orange", pattern="stripes", background="lilac", outline="white"),
    _concept("solid_square", ("orange", "purple"),
             shape="square", colour="blue", pattern="solid", background="mint", outline="black"),
    _concept("checker_cross", ("blue", "red"),
             shape="cross", colour="green", pattern="checker", background="sand", outline="white"),
    _concept("striped_square", ("green", "orange"),
             shape="square", colour="purple", pattern="stripes", background="slate", outline="none"),
    _concept("solid_circle", ("purple", "green"),
             shape="circle", colour="red", pattern="solid", background="sand", outline="none"),
]

CONCEPT_TUPLES = frozenset(concept_key(c["attributes"]) for c in CONCEPTS)
