"""Drawing the shapes world: signed distances of the silhouettes and an anti-aliased rasterizer."""
import numpy as np

from ldm.data.shapes.palette import BACKGROUNDS, COLOURS, DARK_PHASE, OUTLINE_WIDTH, OUTLINES, PATTERN_PERIOD, SHAPES

CANVAS = 32
SUPERSAMPLE = 4
SIZE_RANGE = (18.0, 26.0)  # box side in pixels; a nuisance, like the position
MARGIN = 2.0  # the outer frame stays background: readers find the background there
CROSS_ARM = 0.45  # half-width of a cross arm, in half-box units
CENTROID_V = {"triangle": 1 / 3}  # centroid below the box centre, in half-box units (others: at the centre)


def unit_sdf(shape, u, v):
    """Signed distance to `shape` inscribed in the box [-1, 1]^2, negative inside, in half-box units.

    u, v: (...) float arrays of box coordinates (v points down) -> (...) float.
    Exact inside the convex shapes, which is where the outline ring is measured.
    """
    if shape == "circle":
        return np.hypot(u, v) - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 1.0
    if shape == "triangle":  # apex at the top centre, base along the bottom
        return np.maximum(v - 1.0, (2.0 * np.abs(u) - v - 1.0) / np.sqrt(5.0))
    if shape == "cross":
        bar = np.maximum(np.abs(u) - 1.0, np.abs(v) - CROSS_ARM)
        post = np.maximum(np.abs(u) - CROSS_ARM, np.abs(v) - 1.0)
        return np.minimum(bar, post)
    raise ValueError(f"unknown shape '{shape}': use one of {', '.join(SHAPES)}")


def box_sdf(shape, box, xs, ys):
    """Signed distance in pixels to `shape` fitted to box = (x0, y0, w, h); exact for square boxes.

    xs, ys: (...) pixel coordinates -> (...) float.
    """
    x0, y0, w, h = box
    u = (xs - x0 - w / 2) / (w / 2)
    v = (ys - y0 - h / 2) / (h / 2)
    return unit_sdf(shape, u, v) * min(w, h) / 2


def pattern_dark(pattern, us, vs):
    """Where the pattern takes its dark phase; us, vs: (...) pixels from the shape's centroid -> (...) bool.

    Band edges pass through the centroid, so every shape, even a thin cross arm, shows both phases."""
    band_u = np.floor(us / (PATTERN_PERIOD / 2)).astype(int)
    band_v = np.floor(vs / (PATTERN_PERIOD / 2)).astype(int)
    if pattern == "solid":
        return np.zeros(np.shape(us), dtype=bool)
    if pattern == "stripes":
        return band_v % 2 == 1
    if pattern == "checker":
        return (band_u + band_v) % 2 == 1
    raise ValueError(f"unknown pattern '{pattern}': use one of solid, stripes, checker")


def pixel_grid(n, step=1.0):
    """Pixel-centre coordinates of an n x n grid of cells `step` pixels wide -> ys, xs: (n, n)."""
    centres = (np.arange(n) + 0.5) * step
    return np.meshgrid(centres, centres, indexing="ij")


def rasterize(attrs, box):
    """(CANVAS, CANVAS, 3) uint8 image of `attrs` with the shape in box = (x0, y0, w, h), anti-aliased."""
    n = CANVAS * SUPERSAMPLE
    ys, xs = pixel_grid(n, 1.0 / SUPERSAMPLE)
    dist = box_sdf(attrs["shape"], box, xs, ys)
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2 + CENTROID_V.get(attrs["shape"], 0.0) * box[3] / 2
    dark = pattern_dark(attrs["pattern"], xs - cx, ys - cy)
    fill = np.asarray(COLOURS[attrs["colour"]], float) * np.where(dark, DARK_PHASE, 1.0)[..., None]
    img = np.broadcast_to(np.asarray(BACKGROUNDS[attrs["background"]], float), (n, n, 3)).copy()
    inside = dist <= 0
    img[inside] = fill[inside]
    if OUTLINES[attrs["outline"]] is not None:
        img[inside & (dist > -OUTLINE_WIDTH)] = OUTLINES[attrs["outline"]]
    img = img.reshape(CANVAS, SUPERSAMPLE, CANVAS, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render(attrs, rng):
    """(32, 32, 3) uint8 image of `attrs`; the box size and position (nuisance) are drawn from `rng`."""
    side = rng.uniform(*SIZE_RANGE)
    x0, y0 = rng.uniform(MARGIN, CANVAS - MARGIN - side, size=2)
    return rasterize(attrs, (x0, y0, side, side))
