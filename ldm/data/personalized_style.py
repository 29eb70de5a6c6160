"""Textual-inversion training images of one style, captioned with 'in the style of' templates."""
from ldm.data import personalized

STYLE_TEMPLATES_SMALL = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

# Slot 1 is the style placeholder, slot 2 the per-image token (so "one {}" names the style: kept as the reference).
STYLE_DUAL_TEMPLATES_SMALL = (
    "a painting in the style of {} with {}",
    "a rendering in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "the painting in the style of {} with {}",
    "a clean painting in the style of {} with {}",
    "a dirty painting in the style of {} with {}",
    "a dark painting in the style of {} with {}",
    "a cool painting in the style of {} with {}",
    "a close-up painting in the style of {} with {}",
    "a bright painting in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "a good painting in the style of {} with {}",
    "a painting of one {} in the style of {}",
    "a nice painting in the style of {} with {}",
    "a small painting in the style of {} with {}",
    "a weird painting in the style of {} with {}",
    "a large painting in the style of {} with {}",
)


class PersonalizedStyleBase(personalized.PersonalizedBase):
    """The object dataset with style captions; same arguments and items."""

    templates = STYLE_TEMPLATES_SMALL
    dual_templates = STYLE_DUAL_TEMPLATES_SMALL


# the name reference configs target: ldm.data.personalized_style.PersonalizedBase
PersonalizedBase = PersonalizedStyleBase
