"""FrozenCLIPEmbedder (SD v1 layout, offline tokenizer) and FrozenT5Embedder on tiny local models."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenT5Embedder
from ldm.modules.encoders.tokenizers import default_bert_source
from ldm.util import instantiate_from_config

STAR_PROMPT_IDS = [49406, 320, 1125, 539, 265, 49407]  # "a photo of *" for openai/clip-vit-large-patch14
PROMPTS = ["a photo of a dog", "a sculpture of a teddybear, next to another bear!"]


@pytest.fixture(scope="module")
def clip(make_encoder):
    return make_encoder("clip")


@pytest.fixture(scope="module")
def t5(make_encoder):
    return make_encoder("t5")


def test_clip_tokenizer_gives_the_reference_ids(clip):
    tokens = clip.tokenize(["a photo of *"])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.int64
    assert tokens[0, :6].tolist() == STAR_PROMPT_IDS and (tokens[0, 6:] == 49407).all()  # SD v1 pads with 49407
    assert clip.tokenize(["word " * 200]).shape == (1, 77)


def test_clip_tokenizer_folder_matches_the_bpe_build(clip, encoder_dirs):
    from_folder = FrozenCLIPEmbedder(version=str(encoder_dirs["clip"]),
                                     tokenizer_path=str(encoder_dirs["clip_tokenizer"]))
    assert torch.equal(from_folder.tokenize(PROMPTS), clip.tokenize(PROMPTS))


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_forward_matches_the_hugging_face_model(request, kind):
    encoder = request.getfixturevalue(kind)
    model = encoder.transformer.text_model if kind == "clip" else encoder.transformer
    with torch.no_grad():
        ours = encoder.encode(PROMPTS)
        theirs = model(input_ids=encoder.tokenize(PROMPTS)).last_hidden_state
    assert ours.shape == (2, 77, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_frozen_and_stays_in_eval_mode(request, kind):
    encoder = request.getfixturevalue(kind)
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())


def test_clip_keys_follow_sd_v1(clip, manifest_dir):
    manifest = json.loads((manifest_dir / "manifest_sd-v1.json").read_text())["state_dict"]
    prefix = "cond_stage_model."
    two_layers = [k[len(prefix):] for k in manifest if k.startswith(prefix) and not k.endswith("position_ids")
                  and not any(f"layers.{i}." in k for i in range(2, 12))]
    assert list(clip.state_dict()) == two_layers


def test_checkpoint_position_ids_load_strictly(clip):
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    state["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as in sd-v1-4.ckpt
    clip.load_state_dict(state, strict=True)
    assert "transformer.text_model.embeddings.position_ids" not in clip.state_dict()


def test_v1_inference_builds_the_sd_manifest(manifest_dir):
    manifest = json.loads((manifest_dir / "manifest_sd-v1.json").read_text())
    expected = {k: shape for k, shape in manifest["state_dict"].items() if not k.endswith("position_ids")}
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load("configs/stable-diffusion/v1-inference.yaml").model)
    sd = model.state_dict()
    assert list(sd) == list(expected)  # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    hp = manifest["hyperparameters"]
    assert model.scale_factor == hp["latent_diffusion"]["scale_factor"] and model.image_size == 64


def test_v1_finetune_adds_only_the_embedding(manifest_dir):
    manifest = json.loads((manifest_dir / "manifest_sd-v1.json").read_text())["state_dict"]
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load("configs/stable-diffusion/v1-finetune.yaml").model)
    extra = set(model.state_dict()) - set(manifest)
    assert extra and all(k.startswith("embedding_manager.") for k in extra)
    assert int(model.embedding_manager.string_to_token_dict["*"]) == 265


def test_tokenizer_of_another_size_is_one_clear_line(encoder_dirs):
    with pytest.raises(ValueError, match=r"has 49408 entries but the text encoder expects 1000") as info:
        FrozenCLIPEmbedder(text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls", [FrozenCLIPEmbedder, FrozenT5Embedder])
def test_missing_model_folder_is_one_clear_line(tmp_path, cls):
    with pytest.raises(OSError, match=f"cannot load a .* from '{tmp_path / 'none'}'") as info:
        cls(version=str(tmp_path / "none"))
    assert "\n" not in str(info.value)


def test_t5_tokenizer_that_is_not_the_models_is_one_clear_line(encoder_dirs):
    bert_vocab = default_bert_source()
    with pytest.raises(ValueError, match=r"has 30522 entries but the T5 embedding table holds") as info:
        FrozenT5Embedder(version=str(encoder_dirs["t5"]), tokenizer_path=bert_vocab)
    assert "\n" not in str(info.value)
