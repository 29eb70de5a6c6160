"""Our exported embeddings in diffusers' own load_textual_inversion, and files saved the diffusers way in our manager,
for the text stacks of SD 1.x (CLIP ViT-L/14 layout) and SD 2.x (OpenCLIP ViT-H/14 layout, which diffusers holds as
a transformers CLIPTextModel without its last block); every export format.

Both sides hold the same tiny weights: diffusers' side is a StableDiffusionPipeline (tiny UNet and VAE, unused)
whose encode_prompt gives the text-encoder states of "a photo of <cat-toy>"; ours is the LDM encoder and an
EmbeddingManager. They must agree to 1e-6.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import txt2img
from ldm.modules.embedding_formats import read_embeddings
from ldm.modules.embedding_manager import EmbeddingManager

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from check.convert_embedding import convert  # noqa: E402
from ldm.modules.encoders.convert_openclip import load_hf_text_model  # noqa: E402
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder  # noqa: E402

PROMPT = "a photo of <cat-toy>"
WIDTH = 32
TINY_OPENCLIP = dict(width=WIDTH, heads=2, layers=3, embed_dim=WIDTH)
EXPORTS = [("diffusers", "concept_folder"), ("diffusers", "learned_embeds.bin"),
           ("diffusers", "learned_embeds.safetensors"), ("a1111", "cat-toy.pt"), ("a1111", "cat-toy.safetensors"),
           ("kohya", "cat-toy.safetensors"), ("kohya", "cat-toy.pt")]


def tiny_pipeline(tokenizer, text_encoder):
    """A StableDiffusionPipeline around `text_encoder`; its UNet and VAE are the smallest diffusers builds."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(params=["sd1", "sd2"])
def stacks(request, make_encoder, encoder_dirs):
    """(our encoder, diffusers pipeline) holding the same weights, for SD 1.x or SD 2.x."""
    if request.param == "sd1":
        ours = make_encoder("clip")
        tokenizer = CLIPTokenizer.from_pretrained(encoder_dirs["clip_tokenizer"])
        return ours, tiny_pipeline(tokenizer, CLIPTextModel.from_pretrained(encoder_dirs["clip"]))
    torch.manual_seed(0)
    ours = FrozenOpenCLIPEmbedder(text_config=TINY_OPENCLIP, layer="penultimate")
    tokenizer = CLIPTokenizer.from_pretrained(encoder_dirs["clip_tokenizer"], pad_token="!")  # open_clip pads with 0
    return ours, tiny_pipeline(tokenizer, load_hf_text_model(ours.model, drop_last_block=True))


def theirs(pipe):
    """StableDiffusionPipeline.encode_prompt's states of PROMPT: (1, 77, WIDTH)."""
    with torch.no_grad():
        return pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]


def trained_manager(encoder, num_vectors):
    manager = EmbeddingManager(encoder, ["<cat-toy>"], ["toy"], num_vectors_per_token=num_vectors)
    with torch.no_grad():
        manager.string_to_param_dict["<cat-toy>"].copy_(
            torch.randn(num_vectors, WIDTH, generator=torch.Generator().manual_seed(7)))
    return manager


def ours_of(encoder, manager):
    with torch.no_grad():
        return encoder.encode([PROMPT], embedding_manager=manager)


def test_both_stacks_agree_without_an_embedding(stacks):
    """The premise of the tests below: the prompt without its placeholder encodes the same on both sides."""
    encoder, pipe = stacks
    with torch.no_grad():
        ours = encoder.encode(["a photo of a toy"])
        states = pipe.encode_prompt("a photo of a toy", "cpu", 1, False)[0]
    torch.testing.assert_close(states, ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_vectors", [1, 3])
@pytest.mark.parametrize("fmt, dst", EXPORTS, ids=[f"{f}-{d}" for f, d in EXPORTS])
def test_diffusers_loads_our_export(stacks, tmp_path, num_vectors, fmt, dst):
    encoder, pipe = stacks
    manager = trained_manager(encoder, num_vectors)
    manager.save(tmp_path / "embeddings.pt")
    convert(tmp_path / "embeddings.pt", tmp_path / dst, fmt, name="<cat-toy>")
    pipe.load_textual_inversion(str(tmp_path / dst), token="<cat-toy>")
    assert pipe.tokenizer.convert_tokens_to_ids("<cat-toy>") == 49408
    torch.testing.assert_close(theirs(pipe), ours_of(encoder, manager), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_file_saved_the_diffusers_way_loads_into_our_manager(stacks, tmp_path, suffix):
    """Vectors installed by diffusers' loader, saved as its textual_inversion example saves learned_embeds."""
    encoder, pipe = stacks
    vectors = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(3))
    pipe.load_textual_inversion({"<cat-toy>": vectors})
    ids = pipe.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
    learned = pipe.text_encoder.get_input_embeddings().weight[min(ids):max(ids) + 1].detach()
    path = tmp_path / f"learned_embeds{suffix}"
    if suffix == ".safetensors":
        save_file({"<cat-toy>": learned}, path, metadata={"format": "pt"})
    else:
        torch.save({"<cat-toy>": learned}, path)
    assert read_embeddings(path).format == "diffusers"
    manager = EmbeddingManager(encoder, ["*"])
    manager.load(path)
    assert manager.string_to_param_dict["<cat-toy>"].shape == (2, WIDTH)
    torch.testing.assert_close(ours_of(encoder, manager), theirs(pipe), atol=1e-6, rtol=1e-6)


def test_a_single_vector_of_shape_d_loads(make_encoder, tmp_path):
    vector = torch.randn(WIDTH, generator=torch.Generator().manual_seed(5))
    save_file({"<cat-toy>": vector}, tmp_path / "one.safetensors")
    manager = EmbeddingManager(make_encoder("clip"), ["*"])
    manager.load(tmp_path / "one.safetensors")
    assert torch.equal(manager.string_to_param_dict["<cat-toy>"].detach(), vector[None])


def concept_folder(folder, vectors):
    """A concept folder as diffusers' textual_inversion example writes it (learned_embeds.bin: a torch pickle)."""
    folder.mkdir()
    torch.save({"<cat-toy>": vectors}, folder / "learned_embeds.bin")
    (folder / "token_identifier.txt").write_text("<cat-toy>")
    (folder / "type_of_concept.txt").write_text("object")
    return folder


def test_txt2img_samples_with_a_concept_folder(ckpt, tmp_path):
    """--embedding_path FOLDER samples what the same vectors in a file sample (the tiny LDM: width 32)."""
    vectors = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(9))
    folder = concept_folder(tmp_path / "cat-toy", vectors)
    save_file({"<cat-toy>": vectors}, tmp_path / "cat-toy.safetensors")
    images = []
    for source in (folder, tmp_path / "cat-toy.safetensors"):
        written = txt2img.main(["--config", "configs/tiny/txt2img-tiny-finetune.yaml", "--ckpt_path", ckpt,
                                "--embedding_path", str(source), "--prompt", PROMPT, "--ddim_steps", "3",
                                "--n_samples", "1", "--outdir", str(tmp_path / source.stem), "--device", "cpu"])
        images.append(np.asarray(Image.open(written[0])))
    assert np.array_equal(*images)
