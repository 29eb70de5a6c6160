"""Textual-inversion training images of one object, captioned with prompt templates around the placeholder."""
import hashlib
import json
import os
import random

import numpy as np
from torch.utils.data import Dataset

from ldm.data.images import center_crop, list_images, load_rgb, resampling_filter, resize_square, to_model_range
from ldm.implementation import current
from ldm.modules.placeholders import PER_IMAGE_TOKENS
from ldm.util import get_obj_from_str

_PHOTO_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def _illustrated(medium):
    """The reference repeats the photo list with 'photo of' swapped for another medium in 15 of 27 entries."""
    swapped = []
    for t in _PHOTO_TEMPLATES:
        keep = t.startswith(("a rendering", "a cropped", "the photo", "a dark", "a close-up", "a bright",
                             "a good", "a rendition"))
        swapped.append(t if keep else t.replace("a photo of", f"{medium} of", 1))
    return tuple(swapped)


IMAGENET_TEMPLATES_SMALL = _PHOTO_TEMPLATES + _illustrated("an illustration") + _illustrated("a depiction")

IMAGENET_DUAL_TEMPLATES_SMALL = tuple(t + " with {}" for t in _PHOTO_TEMPLATES)

SPLITS = ("train", "val", "test")


def resolve_templates(templates):
    """A list of "{}" templates, or the dotted name of one -> tuple of templates, each checked."""
    if isinstance(templates, str):
        templates = get_obj_from_str(templates)
    templates = tuple(templates)
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"caption templates need exactly one '{{}}' each (got {bad[:2] or 'none'}): "
                         "e.g. templates: ['a photo of a {}']")
    return templates


def _class_texts(class_texts, data_root, image_paths):
    """{file name: words} or a JSON file name in data_root -> list of words per image path (or None)."""
    if class_texts is None:
        return None
    if isinstance(class_texts, str):
        path = os.path.join(data_root, class_texts)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"class_texts file '{path}' does not exist: write a JSON object "
                                    '{"<image file>": "<words before the placeholder>"} there, '
                                    "or set data.params.train.params.class_texts=null")
        with open(path) as f:
            class_texts = json.load(f)
    names = [os.path.basename(p) for p in image_paths]
    missing = [n for n in names if n not in class_texts]
    if missing:
        raise ValueError(f"class_texts has no words for {', '.join(missing[:3])}: give every image in "
                         f"'{data_root}' an entry")
    return [str(class_texts[n]) for n in names]


def _digest(array):
    """(H, W, 3) uint8 -> hex digest of its content."""
    content = np.ascontiguousarray(array).tobytes() + str(array.shape).encode()
    return hashlib.blake2b(content, digest_size=16).hexdigest()


class PersonalizedBase(Dataset):
    """Items `{"image": (H, W, 3) float32 in [-1, 1], "caption": str}` from the images in `data_root`.

    Length is n_images * repeats for set="train", n_images otherwise. With per_image_tokens, a
    caption names image i's own token with probability mixing_prob; coarse_class_text is put
    before the placeholder ("dog *"); class_texts does the same per image: {file name: words}, or the
    name of a JSON file of that mapping in data_root (images in several colours, each captioned with its
    own colour word, "a photo of a green *", so that the placeholder need not carry the colour); with
    class_text_p < 1 only that share of captions carries the words and the rest name the placeholder alone,
    so that the placeholder also works without them ("a photo of a *").
    `templates` replaces the class's caption templates: a list of strings with one "{}", or the dotted
    name of such a tuple (a world whose text encoder never saw the ImageNet templates' words uses its
    own, e.g. ldm.data.shapes.palette.TEMPLATES).
    """

    templates = IMAGENET_TEMPLATES_SMALL
    dual_templates = IMAGENET_DUAL_TEMPLATES_SMALL
    memo_bytes = 2 ** 30  # images past this many bytes of memo are read at every item

    def __init__(self, data_root, size=None, repeats=100, interpolation="bicubic", flip_p=0.5, set="train",
                 placeholder_token="*", per_image_tokens=False, center_crop=False, mixing_prob=0.25,
                 coarse_class_text=None, class_texts=None, class_text_p=1.0, templates=None):
        if set not in SPLITS:
            raise ValueError(f"unknown set '{set}': use one of {', '.join(SPLITS)}")
        if not 0.0 <= class_text_p <= 1.0:
            raise ValueError(f"class_text_p={class_text_p} is not a probability: give a value in [0, 1]")
        self.image_paths = list_images(data_root)
        self.num_images = len(self.image_paths)
        if per_image_tokens and self.num_images > len(PER_IMAGE_TOKENS):
            raise ValueError(f"per_image_tokens supports at most {len(PER_IMAGE_TOKENS)} images but '{data_root}' "
                             f"holds {self.num_images}: use fewer images or per_image_tokens: false")
        self._length = self.num_images * repeats if set == "train" else self.num_images
        self.size = size
        self.resample = resampling_filter(interpolation)
        self.flip_p = flip_p
        self.placeholder_token = placeholder_token
        self.per_image_tokens = per_image_tokens
        self.center_crop = center_crop
        self.mixing_prob = mixing_prob
        self.coarse_class_text = coarse_class_text
        self.class_texts = _class_texts(class_texts, data_root, self.image_paths)
        self.class_text_p = class_text_p
        if templates is not None:
            self.templates = resolve_templates(templates)
        self._prepared, self._prepared_bytes = {}, 0
        for i in range(self.num_images):
            self.prepared(i)  # a corrupt file fails here, naming itself, not mid-training

    def __len__(self):
        return self._length

    def caption(self, image_index):
        subject = self.placeholder_token
        if self.coarse_class_text:
            subject = f"{self.coarse_class_text} {subject}"
        if self.class_texts and (self.class_text_p == 1.0 or random.random() < self.class_text_p):
            subject = f"{self.class_texts[image_index]} {subject}"
        if self.per_image_tokens and random.random() < self.mixing_prob:
            return random.choice(self.dual_templates).format(subject, PER_IMAGE_TOKENS[image_index])
        return random.choice(self.templates).format(subject)

    def plain_caption(self, image_index):
        """The caption of image `image_index` with nothing drawn: the first template, its class words (if any) and
        the placeholder, e.g. "a photo of a red *"."""
        words = [w for w in (self.class_texts and self.class_texts[image_index], self.coarse_class_text) if w]
        return self.templates[0].format(" ".join([*words, self.placeholder_token]))

    def prepared(self, image_index):
        """-> (H, W, 3) uint8 cropped and resized as configured, and the digests of its content as it is and
        flipped (None without `Implementation.memoise_images`); with it these are kept in memory (within
        `memo_bytes`), so that each file is decoded and resized once per run (without: read at every item, as the
        reference)."""
        memoise = current().memoise_images
        if memoise and image_index in self._prepared:
            return self._prepared[image_index]
        array = load_rgb(self.image_paths[image_index])
        if self.center_crop:
            array = center_crop(array)
        if self.size is not None:
            array = resize_square(array, self.size, self.resample)
        if not memoise:
            return array, None
        entry = array, tuple(_digest(a) for a in (array, array[:, ::-1]))
        if self._prepared_bytes + array.nbytes <= self.memo_bytes:
            self._prepared[image_index] = entry
            self._prepared_bytes += array.nbytes
        return entry

    def image(self, image_index):
        """-> (H, W, 3) float32 in [-1, 1], cropped, resized and randomly flipped as configured, and its key: the
        digest of that content (what the latent cache keys by; an image equal to its flip has one key)."""
        array, digests = self.prepared(image_index)
        flip = random.random() < self.flip_p
        key = digests and digests[flip]
        return to_model_range(array[:, ::-1] if flip else array), key

    def __getitem__(self, i):
        image_index = i % self.num_images
        image, key = self.image(image_index)
        item = {"image": image, "caption": self.caption(image_index)}
        if key is not None:
            item["image_key"] = key
        return item
