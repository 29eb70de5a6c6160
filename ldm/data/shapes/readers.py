"""Analytic readers for the shapes world: the five attributes back from pixels, with no learned model.

Order of reading: background from the border frame; foreground = pixels far from it (largest
component, holes filled); shape = best template fit to the foreground's bounding box, when the fit is close; outline =
share of white / black pixels 2-3 pixels inside the edge that differ from the fill further in;
colour = brightness-normalised median of
the bright interior; pattern = best phase-searched correlation of interior brightness with each
pattern. Every reader answers "unknown" when no palette value fits within its margin, because
generated samples can be wrong in ways a nearest-neighbour rule would hide.
"""
import numpy as np
from PIL import Image

from ldm.data.mask_ops import erode, erode_round, fill_holes, largest_component
from ldm.data.shapes.draw import CANVAS, box_sdf, pattern_dark, pixel_grid
from ldm.data.shapes.palette import ATTRIBUTES, BACKGROUNDS, COLOURS, OUTLINE_WIDTH, PATTERN_PERIOD, SHAPES

UNKNOWN = "unknown"
FRAME = 2  # border width (pixels) sampled for the background
BACKGROUND_TOL = 45.0  # RGB distance to the nearest palette background; palette entries are >= 72 apart
FOREGROUND_DIST = 48.0  # RGB distance from the background that marks foreground; fills are >= 95 away
MIN_AREA = 40  # foreground pixels below which there is no object to read
SHAPE_GROW = (0.0, 0.5, 1.0)  # pixels a template may be grown by, see read_shape
# Least template IoU that counts as the shape. Any compact blob fits the circle and square templates at 0.85-0.89
# (they overlap each other at 0.79), so those two need a close fit; a blob fits the cross and triangle worse, and a
# triangle's blurred apex costs more IoU than a square's corner. Clean renders fit at >= 0.90, blurred ones at
# >= 0.79 (triangles) and >= 0.88 (the others); tests/fixtures/shape_samples holds the model samples that set them.
SHAPE_MIN_IOU = {"circle": 0.89, "square": 0.86, "triangle": 0.7, "cross": 0.83}
# ring pixels: white-ish = every channel above WHITE_MIN, black-ish = every channel below BLACK_MAX, both
# with chroma (max - min) below RING_CHROMA_MAX; every fill has a channel below 70 and its dark phase has
# a channel of 90 or more and a chroma of 70 or more
WHITE_MIN, BLACK_MAX, RING_CHROMA_MAX = 140, 85, 60
OUTLINE_SHARE = 0.45  # share of a side's ring pixels that makes the ring colour hold on that side
MIN_SIDE_PIXELS = 2  # ring pixels a side needs to count
SIDE_SHARE = 0.2  # share of a side's ring pixels that shows the outline's colour there
RING_INNER = 3  # pixels from a ring pixel to the fill it is compared with: past a 2-px outline, inside an 8-px band
COLOUR_TOL = 0.25  # distance between max-normalised colours; nearest palette pair is 0.37 apart
# contrast = (p90 - p10) / p90 of interior brightness: ~0.5 for patterns (dark phase = half), ~0.05 for solid
PATTERN_MIN_CONTRAST, SOLID_CONTRAST = 0.2, 0.35
PATTERN_MIN_CORR, CHECKER_MARGIN = 0.5, 0.05  # near-ties go to stripes: a narrow column of checker is stripes
MIN_PATTERN_PIXELS = 24
EDGE_BLEND = 2  # pixels inside an edge that anti-aliasing and blur mix with the colour beyond it


def _nearest(palette, rgb, tol):
    """Name of the palette entry nearest to rgb: (3,) within tol, else UNKNOWN."""
    names = list(palette)
    dist = np.linalg.norm(np.asarray([palette[n] for n in names], float) - rgb, axis=1)
    return names[dist.argmin()] if dist.min() <= tol else UNKNOWN


def to_canvas(img):
    """(H, W, 3) uint8 -> (CANVAS, CANVAS, 3) float64, resized when needed."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")
    if img.shape[:2] != (CANVAS, CANVAS):
        img = np.asarray(Image.fromarray(img).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR))
    return img.astype(np.float64)


def background_rgb(rgb):
    """Median colour of the border frame; rgb: (H, W, 3) -> (3,)."""
    frame = np.ones(rgb.shape[:2], dtype=bool)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    return np.median(rgb[frame], axis=0)


def foreground_mask(rgb, bg):
    """(H, W) bool: the largest hole-free region of pixels far from the background colour bg: (3,)."""
    far = np.linalg.norm(rgb - bg, axis=-1) > FOREGROUND_DIST
    return fill_holes(largest_component(far))


def _template_iou(shape, box, mask, grow):
    """IoU of mask: (H, W) bool with `shape` fitted `grow` pixels inside box, then grown by `grow` pixels."""
    x0, y0, w, h = box
    grid_y, grid_x = pixel_grid(mask.shape[0])
    template = box_sdf(shape, (x0 + grow, y0 + grow, w - 2 * grow, h - 2 * grow), grid_x, grid_y) <= grow
    return (template & mask).sum() / (template | mask).sum()


def read_shape(mask):
    """Shape whose template, fitted to the bounding box of mask: (H, W) bool, overlaps it best, when it fits closely.

    A high-contrast edge thresholds up to a pixel outside the drawn silhouette, which thickens a cross's
    arms but not its extent; growing each template by up to SHAPE_GROW pixels absorbs that. A best fit under
    the shape's SHAPE_MIN_IOU (a blob, a broken shape) is UNKNOWN: a shape counts only when it is the shape.
    """
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
    iou = {s: max(_template_iou(s, box, mask, g) for g in SHAPE_GROW) for s in SHAPES}
    best = max(iou, key=iou.get)
    return best if iou[best] >= SHAPE_MIN_IOU[best] else UNKNOWN


def _ring_class(pixels):
    """(N, 3) -> (N,) int: 1 white-ish, 2 black-ish, 0 other; ring colours are grey, fills are saturated."""
    high, low = pixels.max(axis=1), pixels.min(axis=1)
    grey = high - low < RING_CHROMA_MAX
    return np.where(grey & (low > WHITE_MIN), 1, np.where(grey & (high < BLACK_MAX), 2, 0))


def _ring_shares(rgb, ring, inner):
    """Shares of white-ish / black-ish pixels in `ring`, over it all and on each side -> (2,), (4, 2).

    rgb: (H, W, 3); ring, inner: (H, W) bool. An outline is a thin ring set off from the fill inside it,
    so a ring pixel as white or as black as its nearest `inner` pixel tells nothing (a dark pattern band
    reaching the edge) and is left out. Sides: up, right, down, left of the centre; one with under
    MIN_SIDE_PIXELS pixels left is 0.
    """
    ring_yx, inner_yx = np.argwhere(ring), np.argwhere(inner)
    cls = _ring_class(rgb[ring])
    keep = np.ones(len(cls), dtype=bool)
    if len(inner_yx):
        nearest = ((ring_yx[:, None, :] - inner_yx[None, :, :]) ** 2).sum(-1).argmin(axis=1)
        keep = (cls == 0) | (_ring_class(rgb[inner])[nearest] != cls)
    dy, dx = (ring_yx - np.argwhere(ring | inner).mean(axis=0)).T
    side = np.round(np.arctan2(dx, -dy) / (np.pi / 2)).astype(int) % 4
    per_side = np.zeros((4, 2))
    for k in range(4):
        on = keep & (side == k)
        if on.sum() >= MIN_SIDE_PIXELS:
            per_side[k] = np.mean(cls[on] == 1), np.mean(cls[on] == 2)
    overall = np.array([np.mean(cls[keep] == 1), np.mean(cls[keep] == 2)]) if keep.any() else np.zeros(2)
    return overall, per_side


def read_outline(rgb, mask):
    """White / black / none from the ring layers 2 and 3 pixels inside the edge.

    rgb: (H, W, 3), mask: (H, W) bool. Blur moves the ring relative to the thresholded edge, hence both
    layers, the better one taken per side. A ring colour is an outline when it fills OUTLINE_SHARE of a
    layer and shows on at least three sides; there is none when no colour fills a side beyond one: a
    dark band along one edge of a striped shape is not an outline.
    """
    def layer(d):  # depth d, 1 = the edge pixels
        return erode(mask, d - 1) & ~erode(mask, d)

    shares = [_ring_shares(rgb, layer(d), layer(d + RING_INNER))
              for d in (2, 3) if layer(d).any()]  # layer 1 mixes fill and background
    if not shares:
        return UNKNOWN
    overall = np.max([o for o, _ in shares], axis=0)  # (2,) white, black
    per_side = np.max([s for _, s in shares], axis=0)  # (4, 2)
    c = overall.argmax()
    if overall[c] >= OUTLINE_SHARE and (per_side[:, c] >= SIDE_SHARE).sum() >= 3:
        return ("white", "black")[c]
    return "none" if (per_side >= OUTLINE_SHARE).sum(axis=0).max() <= 1 else UNKNOWN


def read_colour(pixels):
    """Palette colour of the bright half of pixels: (N, 3), compared after scaling each to max channel 1."""
    value = pixels.max(axis=1)
    rgb = np.median(pixels[value >= np.median(value)], axis=0)
    unit = {name: np.asarray(c, float) / max(c) for name, c in COLOURS.items()}
    return _nearest(unit, rgb / max(rgb.max(), 1.0), COLOUR_TOL)


def _best_phase_corr(value, xs, ys, pattern):
    """Max over half-pixel phases of corr(value, bright phase of pattern); value, xs, ys: (N,)."""
    shifts = np.arange(0, PATTERN_PERIOD, 0.5)
    du, dv = np.meshgrid(shifts if pattern == "checker" else shifts[:1], shifts)
    bright = (~pattern_dark(pattern, xs + 0.5 + du.reshape(-1, 1), ys + 0.5 + dv.reshape(-1, 1))).astype(float)
    t = bright - bright.mean(axis=1, keepdims=True)  # (K, N) zero-mean templates, one per phase
    v = value - value.mean()
    norm = np.linalg.norm(t, axis=1) * np.linalg.norm(v)
    return float(np.max(np.where(norm > 0, t @ v / np.maximum(norm, 1e-9), 0.0)))


def read_pattern(rgb, interior):
    """Solid / stripes / checker from the brightness (max channel) of interior: (H, W) bool pixels.

    A periodic fit wins when the contrast could be a pattern's; otherwise low contrast means solid.
    """
    ys, xs = np.nonzero(interior)
    value = rgb[interior].max(axis=1)
    if len(value) < MIN_PATTERN_PIXELS:
        return UNKNOWN
    low, high = np.percentile(value, [10, 90])
    contrast = (high - low) / max(high, 1.0)
    stripes = _best_phase_corr(value, xs, ys, "stripes")
    checker = _best_phase_corr(value, xs, ys, "checker")
    if contrast >= PATTERN_MIN_CONTRAST and max(stripes, checker) >= PATTERN_MIN_CORR:
        return "checker" if checker > stripes + CHECKER_MARGIN else "stripes"
    return "solid" if contrast < SOLID_CONTRAST else UNKNOWN


def _interior(mask, depth):
    """mask: (H, W) bool eroded by `depth`, or by less where that would leave too few pixels to read."""
    for d in range(depth, 0, -1):
        inner = erode_round(mask, d)
        if inner.sum() >= MIN_PATTERN_PIXELS:
            return inner
    return inner


def read_attributes(img):
    """{shape, colour, pattern, background, outline} of img: (H, W, 3) uint8; "unknown" where nothing fits."""
    rgb = to_canvas(img)
    bg = background_rgb(rgb)
    attrs = dict.fromkeys(ATTRIBUTES, UNKNOWN)
    attrs["background"] = _nearest(BACKGROUNDS, bg, BACKGROUND_TOL)
    mask = foreground_mask(rgb, bg)
    if mask.sum() < MIN_AREA:
        return attrs
    attrs["shape"] = read_shape(mask)
    attrs["outline"] = read_outline(rgb, mask)
    interior = _interior(mask, EDGE_BLEND + (0 if attrs["outline"] == "none" else OUTLINE_WIDTH))
    if interior.any():
        attrs["colour"] = read_colour(rgb[interior])
        attrs["pattern"] = read_pattern(rgb, interior)
    return attrs
