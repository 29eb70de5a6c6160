"""Personalization datasets: items, captions, bad folders, non-RGB images."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.personalized import IMAGENET_TEMPLATES_SMALL, PER_IMAGE_TOKENS, PersonalizedBase, load_rgb
from ldm.data.personalized_style import STYLE_TEMPLATES_SMALL
from ldm.data.personalized_style import PersonalizedBase as StyleBase


def save(image, path):
    image.save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """Two RGB images of different sizes and a text file that is skipped."""
    rng = np.random.default_rng(0)
    save(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)), tmp_path / "a.png")
    save(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)), tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_items_and_length(folder):
    data = PersonalizedBase(str(folder), size=16, repeats=5, center_crop=True, placeholder_token="<cat-toy>")
    assert len(data) == 10 and len(PersonalizedBase(str(folder), set="val")) == 2
    item = data[3]
    assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert "<cat-toy>" in item["caption"] and item["caption"].replace("<cat-toy>", "{}") in IMAGENET_TEMPLATES_SMALL


def test_templates_are_the_reference_lists():
    assert len(IMAGENET_TEMPLATES_SMALL) == 81 and len(STYLE_TEMPLATES_SMALL) == 19
    assert (IMAGENET_TEMPLATES_SMALL[27] == "an illustration of a {}"
            and IMAGENET_TEMPLATES_SMALL[28] == "a rendering of a {}")
    assert IMAGENET_TEMPLATES_SMALL[80] == "a depiction of a small {}"


def test_caption_options(folder):
    style = StyleBase(str(folder), placeholder_token="S*")
    assert all("in the style of S*" in style[i]["caption"] for i in range(4))
    coarse = PersonalizedBase(str(folder), coarse_class_text="dog")
    assert "dog *" in coarse[0]["caption"]
    mixed = PersonalizedBase(str(folder), per_image_tokens=True, mixing_prob=1.0)
    assert [mixed[i]["caption"].endswith(f"* with {PER_IMAGE_TOKENS[i]}") for i in range(2)] == [True, True]


def test_class_texts_name_each_image_before_the_placeholder(folder):
    (folder / "words.json").write_text('{"a.png": "green", "b.jpg": "blue"}')
    for class_texts in ("words.json", {"a.png": "green", "b.jpg": "blue"}):
        data = PersonalizedBase(str(folder), class_texts=class_texts, templates=["a photo of a {}"])
        assert [data[i]["caption"] for i in range(4)] == ["a photo of a green *", "a photo of a blue *"] * 2
        assert [data.plain_caption(i) for i in range(2)] == ["a photo of a green *", "a photo of a blue *"]
    with pytest.raises(ValueError, match="no words for b.jpg"):
        PersonalizedBase(str(folder), class_texts={"a.png": "green"})
    with pytest.raises(FileNotFoundError, match="missing.json.*class_texts=null"):
        PersonalizedBase(str(folder), class_texts="missing.json")


def test_class_text_p_leaves_the_words_out_of_a_share_of_captions(folder):
    import random

    words = {"a.png": "green", "b.jpg": "blue"}
    random.seed(0)
    half = PersonalizedBase(str(folder), class_texts=words, class_text_p=0.5, templates=["a photo of a {}"])
    captions = [half[i]["caption"] for i in range(400)]
    assert set(captions) == {"a photo of a *", "a photo of a green *", "a photo of a blue *"}
    assert 150 < captions.count("a photo of a *") < 250
    never = PersonalizedBase(str(folder), class_texts=words, class_text_p=0.0, templates=["a photo of a {}"])
    assert {never[i]["caption"] for i in range(20)} == {"a photo of a *"}
    with pytest.raises(ValueError, match="class_text_p=1.5 is not a probability"):
        PersonalizedBase(str(folder), class_texts=words, class_text_p=1.5)


def test_templates_option(folder):
    from ldm.data.shapes.palette import TEMPLATES

    named = PersonalizedBase(str(folder), templates="ldm.data.shapes.palette.TEMPLATES")
    assert named.templates == TEMPLATES and type(PersonalizedBase(str(folder)).templates) is tuple
    assert all(named[i]["caption"].replace("*", "{}") in TEMPLATES for i in range(20))
    listed = PersonalizedBase(str(folder), templates=["a render of {}"], placeholder_token="S*")
    assert listed[1]["caption"] == "a render of S*" and PersonalizedBase.templates == IMAGENET_TEMPLATES_SMALL
    for bad in ([], ["no slot"], ["{} and {}"]):
        with pytest.raises(ValueError, match="exactly one"):
            PersonalizedBase(str(folder), templates=bad)


def test_flip(folder):
    plain = PersonalizedBase(str(folder), flip_p=0.0)[0]["image"]
    flipped = PersonalizedBase(str(folder), flip_p=1.0)[0]["image"]
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_images_are_read_once_and_keyed_by_content(folder, monkeypatch):
    data = PersonalizedBase(str(folder), size=16, flip_p=0.0)
    other_size = PersonalizedBase(str(folder), size=8, flip_p=0.0)[0]["image_key"]
    monkeypatch.setattr("ldm.data.personalized.load_rgb", lambda path: pytest.fail(f"{path} read again"))
    first, again = data[0], data[2]  # the same image: from memory, the same key
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["image_key"] == again["image_key"] != data[1]["image_key"]
    data.flip_p = 1.0
    flipped = data[0]
    np.testing.assert_array_equal(flipped["image"], first["image"][:, ::-1])
    assert flipped["image_key"] not in (first["image_key"], data[1]["image_key"])
    assert other_size != first["image_key"]  # another size is another content, another key


def test_an_image_equal_to_its_flip_has_one_key(tmp_path):
    symmetric = np.zeros((8, 8, 3), np.uint8)
    symmetric[2:6, 1:7] = 200
    save(Image.fromarray(symmetric), tmp_path / "a.png")
    keys = {PersonalizedBase(str(tmp_path), flip_p=p)[0]["image_key"] for p in (0.0, 1.0)}
    assert len(keys) == 1  # as the latent cache's own content digest would see it


def test_without_memo_every_item_reads_its_file(folder, monkeypatch):
    from ldm.implementation import Implementation, using

    with using(Implementation(memoise_images=False)):
        data = PersonalizedBase(str(folder), size=16, flip_p=0.0)
        reads = []
        monkeypatch.setattr("ldm.data.personalized.load_rgb",
                            lambda path: reads.append(path) or np.zeros((4, 4, 3), np.uint8))
        item = data[0]
    assert reads == [data.image_paths[0]] and "image_key" not in item and item["image"].shape == (16, 16, 3)


def test_images_past_the_memo_budget_are_read_at_every_item(folder, monkeypatch):
    monkeypatch.setattr(PersonalizedBase, "memo_bytes", 16 * 16 * 3)  # one 16 px image
    data = PersonalizedBase(str(folder), size=16, flip_p=0.0)
    kept = data[0]
    reads = []
    monkeypatch.setattr("ldm.data.personalized.load_rgb", lambda path: reads.append(path) or load_rgb(path))
    assert [data[i]["image_key"] for i in (0, 1, 2, 3)] == [kept["image_key"], data[1]["image_key"]] * 2
    assert reads == [data.image_paths[1]] * 3  # the second image did not fit: read at each of its items


def test_non_rgb_images_are_converted(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest transparent
    save(Image.fromarray(rgba, "RGBA"), tmp_path / "0_rgba.png")
    save(Image.fromarray(np.full((4, 4), 64, dtype=np.uint8), "L"), tmp_path / "1_gray.png")
    palette = Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 255] + [0] * 765)
    save(palette, tmp_path / "2_palette.png")
    save(Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16)), tmp_path / "3_16bit.png")
    data = PersonalizedBase(str(tmp_path), set="val", flip_p=0.0)
    images = [((data[i]["image"] + 1.0) * 127.5).round().astype(int) for i in range(4)]
    assert images[0][0, 0].tolist() == [255, 0, 0] and images[0][1, 1].tolist() == [255, 255, 255]
    assert images[1][0, 0].tolist() == [64, 64, 64]
    assert images[2][0, 0].tolist() == [0, 0, 255]
    assert images[3][0, 0].tolist() == [128, 128, 128]  # scaled from 16 bits; a plain convert("RGB") clips to 255


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        PersonalizedBase(str(tmp_path / "nope"))


@pytest.mark.parametrize("files", [[], ["readme.md"]])
def test_folder_without_images(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text("x")
    with pytest.raises(FileNotFoundError, match=f"no images in '{tmp_path}'.*\\.png") as info:
        PersonalizedBase(str(tmp_path))
    assert "\n" not in str(info.value)


def test_corrupt_image_names_the_file(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        PersonalizedBase(str(folder))


def test_bad_options(folder):
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        PersonalizedBase(str(folder), interpolation="cubic")
    with pytest.raises(ValueError, match="unknown set 'trian'"):
        PersonalizedBase(str(folder), set="trian")
