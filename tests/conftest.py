import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def fixture_dir():
    return ROOT / "tests" / "fixtures" / "ldm_tiny"


@pytest.fixture(scope="session")
def manifest_dir():
    return ROOT / "tests" / "fixtures" / "manifests"


@pytest.fixture(scope="session")
def encoder_dirs(tmp_path_factory):
    """Local folders of a tiny CLIPTextModel, a tiny T5 encoder with its tokenizer, and SD v1's CLIP tokenizer."""
    from tiny_text_encoders import clip_tokenizer_folder, tiny_clip_folder, tiny_t5_folder

    root = tmp_path_factory.mktemp("encoders")
    return {"clip": tiny_clip_folder(root / "clip"), "t5": tiny_t5_folder(root / "t5"),
            "clip_tokenizer": clip_tokenizer_folder(root / "clip_tokenizer")}


@pytest.fixture(scope="session")
def make_encoder(encoder_dirs, fixture_dir):
    """make_encoder('bert' | 'clip' | 't5') -> a fresh frozen tiny text encoder of width 32 (own tokenizer copy)."""
    from safetensors.torch import load_file

    from ldm.modules.encoders.modules import BERTEmbedder, FrozenCLIPEmbedder, FrozenT5Embedder

    prefix = "cond_stage_model."
    bert_state = {k[len(prefix):]: v for k, v in load_file(str(fixture_dir / "state_dict.safetensors")).items()
                  if k.startswith(prefix)}

    def make(kind):
        if kind == "bert":
            bert = BERTEmbedder(n_embed=32, n_layer=2)
            bert.load_state_dict(bert_state, strict=True)
            return bert.freeze()
        if kind == "clip":
            return FrozenCLIPEmbedder(version=str(encoder_dirs["clip"]))
        return FrozenT5Embedder(version=str(encoder_dirs["t5"]))

    return make


@pytest.fixture(scope="session")
def ckpt(fixture_dir):
    """The reference tiny LDM's weights, used as --actual_resume by the training tests."""
    return str(fixture_dir / "state_dict.safetensors")


@pytest.fixture(scope="module")
def tiny_bert(fixture_dir):
    """BERTEmbedder(32, 2) holding the tiny model's `cond_stage_model.` weights, frozen (one per test module:
    managers register placeholder tokens in its tokenizer)."""
    from safetensors.torch import load_file

    from ldm.modules.encoders.modules import BERTEmbedder

    state = load_file(str(fixture_dir / "state_dict.safetensors"))
    prefix = "cond_stage_model."
    bert = BERTEmbedder(n_embed=32, n_layer=2)
    bert.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return bert.freeze()


@pytest.fixture(scope="module")
def tiny_concept(tmp_path_factory):
    """A folder of two 16x16 images: a red square on a grey or black ground."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("concept")
    for i in range(2):
        arr = np.full((16, 16, 3), 30 + 60 * i, np.uint8)
        arr[3:13, 3:13] = (220, 40, 40)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return str(folder)


@pytest.fixture(scope="session")
def train_tiny(ckpt):
    """train_tiny(images, logdir, *extra, overlays=()) -> ldm.training.Run: TI on the reference tiny LDM."""
    import train_new

    def train(images, logdir, *extra, overlays=()):
        return train_new.main(["--base", "configs/tiny/txt2img-tiny-finetune.yaml", "-t", "--actual_resume", ckpt,
                               "-n", "tiny", "--data_root", images, "--init_word", "dog",
                               "--placeholder_string", "*", "-l", str(logdir), *extra], overlays=overlays)
    return train
