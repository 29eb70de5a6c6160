"""Image folders for the personalization datasets: listing, decoding to RGB, cropping, resizing."""
import logging
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resampling_filter(name):
    if name not in RESAMPLING:
        raise ValueError(f"unknown interpolation '{name}': use one of {', '.join(RESAMPLING)}")
    return RESAMPLING[name]


def list_images(data_root):
    """Sorted paths of the image files directly in `data_root`; other files are skipped with a warning."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data_root '{data_root}' is not a folder: point data_root at a folder of "
                                "training images")
    names = sorted(n for n in os.listdir(data_root) if not n.startswith("."))
    paths = [os.path.join(data_root, n) for n in names if os.path.isfile(os.path.join(data_root, n))]
    images = [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)]
    skipped = sorted(set(paths) - set(images))
    if skipped:
        logger.warning("skipping %d non-image file(s) in %s: %s", len(skipped), data_root,
                       ", ".join(os.path.basename(p) for p in skipped))
    if not images:
        raise FileNotFoundError(f"no images in '{data_root}': add files with one of the extensions "
                                f"{' '.join(IMAGE_EXTENSIONS)}")
    return images


def to_rgb(image):
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit grayscale scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # convert("RGB") would clip these to 255; 16-bit data is scaled to 0..255 instead
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_rgb(path):
    """path -> (H, W, 3) uint8, upright per its EXIF orientation; a file that does not decode raises naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.asarray(to_rgb(image), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image '{path}' ({e}): replace or remove the file") from e


def center_crop(array):
    """(H, W, C) -> (S, S, C) with S = min(H, W), cut from the middle."""
    h, w = array.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return array[top:top + s, left:left + s]


def resize_square(array, size, resample):
    """(H, W, 3) uint8 -> (size, size, 3) uint8"""
    return np.asarray(Image.fromarray(array).resize((size, size), resample=resample))


def to_model_range(array):
    """(H, W, 3) uint8 -> float32 in [-1, 1]"""
    return (array / 127.5 - 1.0).astype(np.float32)
