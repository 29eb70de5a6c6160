"""Binary-mask morphology in plain numpy (4-connectivity): labelling, largest component, holes, erosion."""
import numpy as np


def _neighbour_min(labels):
    """Elementwise min of each cell of labels: (H, W) and its 4 neighbours inside the image."""
    out = labels.copy()
    np.minimum(out[1:], labels[:-1], out=out[1:])
    np.minimum(out[:-1], labels[1:], out=out[:-1])
    np.minimum(out[:, 1:], labels[:, :-1], out=out[:, 1:])
    np.minimum(out[:, :-1], labels[:, 1:], out=out[:, :-1])
    return out


def label_components(mask):
    """mask: (H, W) bool -> (H, W) int64 labels, 0 off the mask, one positive label per 4-connected component."""
    h, w = mask.shape
    off = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), off)
    while True:
        spread = np.where(mask, _neighbour_min(labels), off)
        # a label names a pixel of the same component: taking that pixel's label shortcuts long paths
        spread[mask] = spread.ravel()[spread[mask] - 1]
        if np.array_equal(spread, labels):
            return np.where(mask, labels, 0)
        labels = spread


def largest_component(mask):
    """(H, W) bool -> (H, W) bool keeping only the largest 4-connected component (all False if empty)."""
    labels = label_components(mask)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax() if counts.any() else np.zeros_like(mask)


def fill_holes(mask):
    """(H, W) bool -> (H, W) bool with every off-region that does not touch the image edge switched on."""
    labels = label_components(~mask)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return mask | ((labels > 0) & ~np.isin(labels, edge))


def _erode_plus(mask):
    """One 4-neighbour erosion step; off-image counts as off."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[[0, -1]] = False
    out[:, [0, -1]] = False
    return out


def _erode_square(mask):
    """One 8-neighbour (3x3) erosion step, as a row pass then a column pass; off-image counts as off."""
    rows = mask.copy()
    rows[:, 1:] &= mask[:, :-1]
    rows[:, :-1] &= mask[:, 1:]
    rows[:, [0, -1]] = False
    out = rows.copy()
    out[1:] &= rows[:-1]
    out[:-1] &= rows[1:]
    out[[0, -1]] = False
    return out


def erode(mask, steps=1):
    """(H, W) bool -> (H, W) bool keeping pixels at least `steps` + 1 pixels deep (4-neighbour erosion)."""
    for _ in range(steps):
        mask = _erode_plus(mask)
    return mask


def erode_round(mask, steps=1):
    """(H, W) bool -> (H, W) bool shrunk by `steps` pixels in every direction, concave corners included.

    Alternating 3x3 and 4-neighbour steps grows an octagon, close to a disc; 4-neighbour steps alone
    reach only 1/sqrt(2) as far along diagonals and leave pixels next to a concave corner.
    """
    for k in range(steps):
        mask = _erode_square(mask) if k % 2 == 0 else _erode_plus(mask)
    return mask
