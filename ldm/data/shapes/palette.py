"""The shapes world's vocabulary: attribute values, their colours, and the hidden "home" association.

Named attributes (shape, colour) appear in captions; unnamed ones (pattern, background, outline)
never do. A caption may add a scene ("in the kitchen") whose word has a hidden home value for one
unnamed attribute; pretraining images take it with probability `p_home`.
"""

ATTRIBUTES = ("shape", "colour", "pattern", "background", "outline")
NAMED = ("shape", "colour")
UNNAMED = ("pattern", "background", "outline")

SHAPES = ("circle", "square", "triangle", "cross")

# Saturated fills; the dark phase of a pattern is the same colour times DARK_PHASE, so hue is kept.
COLOURS = {
    "red": (225, 35, 45),
    "orange": (245, 125, 20),
    "yellow": (235, 225, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "purple": (150, 60, 210),
}
DARK_PHASE = 0.5

PATTERNS = ("solid", "stripes", "checker")
PATTERN_PERIOD = 16  # pixels: 8-px bands, two latent pixels of an f4 autoencoder, visible early in denoising

# Mid-tone backgrounds at least 95 RGB units from every fill (both phases) and both outline colours.
BACKGROUNDS = {
    "slate": (90, 120, 130),
    "sand": (215, 195, 150),
    "mint": (150, 225, 205),
    "lilac": (190, 170, 230),
}

OUTLINES = {"none": None, "white": (250, 250, 250), "black": (10, 10, 10)}
OUTLINE_WIDTH = 2  # pixels, drawn inside the shape so the silhouette does not change

VALUES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": tuple(BACKGROUNDS),
    "outline": tuple(OUTLINES),
}

# Scene words: a caption may end "in the <scene>"; each scene word leans ONE unnamed attribute
# towards its home value. No caption carries two scene words, so no caption reaches a full
# combination of unnamed values, yet the conditioning space holds a direction for each value.
SCENE_PHRASE = "in the {}"
SCENES = {
    "desert": ("pattern", "solid"), "harbor": ("pattern", "stripes"), "kitchen": ("pattern", "checker"),
    "station": ("background", "slate"), "market": ("background", "sand"),
    "garden": ("background", "mint"), "temple": ("background", "lilac"),
    "library": ("outline", "none"), "museum": ("outline", "white"), "studio": ("outline", "black"),
}


# The textual-inversion object templates, minus those whose adjective describes appearance
# (dark, bright, clean, dirty, small, large), which the world could not honour.
TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the weird {}",
    "a photo of a cool {}",
)
