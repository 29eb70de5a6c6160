"""Held-out concepts of the shapes world: full attribute tuples no pretraining caption reaches.

Every unnamed value of a concept is the home of some *other* word, never of its own shape or
colour, so the pseudo-word `*` has to find it; the pretraining sampler rejects these exact
tuples. The init word is the shape name (the coarse class word of the original method) and the
edits swap the colour word, expecting every other attribute of the concept to stay.
"""
from ldm.data.shapes_palette import ATTRIBUTES, home_values


def _concept(name, edit_colours, **attributes):
    edits = [{"prompt": f"a photo of a {c} *", "attribute": "colour", "value": c} for c in edit_colours]
    return {"name": name, "init_word": attributes["shape"], "attributes": attributes, "edits": edits}


CONCEPTS = [
    _concept("checker_red_circle", ("blue", "yellow"),
             shape="circle", colour="red", pattern="checker", background="slate", outline="black"),
    _concept("striped_blue_triangle", ("red", "green"),
             shape="triangle", colour="blue", pattern="stripes", background="lilac", outline="white"),
    _concept("solid_green_square", ("orange", "purple"),
             shape="square", colour="green", pattern="solid", background="mint", outline="black"),
    _concept("checker_yellow_cross", ("blue", "red"),
             shape="cross", colour="yellow", pattern="checker", background="sand", outline="white"),
    _concept("striped_purple_square", ("green", "orange"),
             shape="square", colour="purple", pattern="stripes", background="lilac", outline="white"),
    _concept("solid_orange_circle", ("purple", "green"),
             shape="circle", colour="orange", pattern="solid", background="sand", outline="none"),
]

CONCEPT_TUPLES = frozenset(tuple(c["attributes"][a] for a in ATTRIBUTES) for c in CONCEPTS)


def homes_avoided(concept):
    """True when no unnamed value of `concept` is the home of its own shape or colour word."""
    attrs = concept["attributes"]
    homes = home_values(attrs["shape"], attrs["colour"])
    return all(attrs[a] != v for a, v in homes.items())
