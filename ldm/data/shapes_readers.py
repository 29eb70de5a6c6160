"""Analytic readers for the shapes world: the five attributes back from pixels, with no learned model.

Order of reading: background from the border frame; foreground = pixels far from it (largest
component, holes filled); shape = best template fit to the foreground's bounding box; outline =
share of white / black pixels 2-3 pixels inside the edge; colour = brightness-normalised median of
the bright interior; pattern = best phase-searched correlation of interior brightness with each
pattern. Every reader answers "unknown" when no palette value fits within its margin, because
generated samples can be wrong in ways a nearest-neighbour rule would hide.
"""
import numpy as np
from PIL import Image

from ldm.data.mask_ops import erode, erode_round, fill_holes, largest_component
from ldm.data.shapes_draw import CANVAS, box_sdf, pattern_dark, pixel_grid
from ldm.data.shapes_palette import ATTRIBUTES, BACKGROUNDS, COLOURS, OUTLINE_WIDTH, PATTERN_PERIOD, SHAPES

UNKNOWN = "unknown"
FRAME = 2  # border width (pixels) sampled for the background
BACKGROUND_TOL = 45.0  # RGB distance to the nearest palette background; palette entries are >= 72 apart
FOREGROUND_DIST = 48.0  # RGB distance from the background that marks foreground; fills are >= 95 away
MIN_AREA = 40  # foreground pixels below which there is no object to read
SHAPE_GROW = (0.0, 0.5, 1.0)  # pixels a template may be grown by, see read_shape
SHAPE_MIN_IOU = 0.7  # circle vs square templates overlap at 0.79, so the argmax decides, this only rejects blobs
# ring pixels: white-ish = every channel above WHITE_MIN, black-ish = every channel below BLACK_MAX, both
# with chroma (max - min) below RING_CHROMA_MAX; every fill has a channel below 70 and its dark phase has
# a channel of 90 or more and a chroma of 70 or more
WHITE_MIN, BLACK_MAX, RING_CHROMA_MAX = 140, 85, 60
OUTLINE_SHARE, NO_OUTLINE_SHARE = 0.45, 0.2  # ring share for a ring colour / below which there is no ring
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
    """Shape whose template, fitted to the bounding box of mask: (H, W) bool, overlaps it best.

    A high-contrast edge thresholds up to a pixel outside the drawn silhouette, which thickens a cross's
    arms but not its extent; growing each template by up to SHAPE_GROW pixels absorbs that.
    """
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
    iou = {s: max(_template_iou(s, box, mask, g) for g in SHAPE_GROW) for s in SHAPES}
    best = max(iou, key=iou.get)
    return best if iou[best] >= SHAPE_MIN_IOU else UNKNOWN


def _ring_shares(ring):
    """Shares of white-ish and black-ish pixels in ring: (N, 3); ring colours are grey, fills are saturated."""
    high, low = ring.max(axis=1), ring.min(axis=1)
    white = np.mean((low > WHITE_MIN) & (high - low < RING_CHROMA_MAX))
    black = np.mean((high < BLACK_MAX) & (high - low < RING_CHROMA_MAX))
    return white, black


def read_outline(rgb, mask):
    """White / black / none from the ring layer 2 or 3 pixels inside the edge, whichever shows more of either.

    rgb: (H, W, 3), mask: (H, W) bool. Blur moves the ring relative to the thresholded edge, hence the search.
    """
    layers = [erode(mask, d - 1) & ~erode(mask, d) for d in (2, 3)]  # layer 1 mixes fill and background
    shares = np.array([_ring_shares(rgb[layer]) for layer in layers if layer.any()]).reshape(-1, 2)
    if len(shares) == 0:
        return UNKNOWN
    white, black = shares.max(axis=0)
    if max(white, black) >= OUTLINE_SHARE:
        return "white" if white > black else "black"
    return "none" if max(white, black) < NO_OUTLINE_SHARE else UNKNOWN


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
