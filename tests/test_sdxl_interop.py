"""SDXL interop: our OpenCLIP tower in transformers' layout (convert_openclip), and our SDXL embedding file in a
tiny StableDiffusionXLPipeline's own `load_textual_inversion`, called once per text encoder with
state_dict["clip_l"] / ["clip_g"] as diffusers documents for SDXL. Both sides hold the tiny SDXL fixture's
weights; the text-encoder states for a prompt with the placeholder must agree (tolerance of single fp32 passes)."""
import copy

import pytest
import torch
from safetensors.torch import load_file
from test_sdxl import tiny_model  # the tiny SDXL fixture model

from ldm.modules.encoders.convert_openclip import load_hf_text_model, openclip_text_to_hf
from ldm.modules.encoders.tokenizers import write_clip_tokenizer_files

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa
from transformers import CLIPTokenizer  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
PLACEHOLDER = "<xl-toy>"
PROMPTS = ["a photo of <xl-toy> on a beach", "a photograph of an astronaut riding a horse"]


@pytest.fixture(scope="module")
def ours():
    return tiny_model({"target": "ldm.modules.embedding_manager_xl.SDXLEmbeddingManager",
                       "params": {"placeholder_strings": [PLACEHOLDER], "initializer_words": ["dog"],
                                  "num_vectors_per_token": 2}})


def tiny_xl_pipeline(tokenizer, text_encoder, tokenizer_2, text_encoder_2):
    """A StableDiffusionXLPipeline around the two text encoders; its UNet and VAE are the smallest diffusers builds
    of SDXL's kind (text_time conditioning), never run: only encode_prompt is."""
    torch.manual_seed(0)
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    pooled = text_encoder_2.config.projection_dim
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width,
                                attention_head_dim=(2, 4), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + pooled)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler(), add_watermarker=False)


def encode(pipe, prompts):
    """StableDiffusionXLPipeline.encode_prompt -> (B, 77, D_l + D_g) states, (B, E) pooled."""
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    return states, pooled


def fresh_tokenizer(folder, **specials):
    """A CLIPTokenizer of its own (diffusers adds the placeholder to it), from the shipped OpenAI BPE."""
    folder.mkdir()
    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, **specials)


def diffusers_pipeline(model, folder):
    """A tiny StableDiffusionXLPipeline holding `model`'s text-encoder weights (CLIP-L as is, bigG converted)."""
    clip_l, clip_g = model.cond_stage_model.embedders[:2]
    tokenizer_2 = fresh_tokenizer(folder / "2", pad_token="!")  # SDXL's tokenizer_2 pads with "!" (id 0)
    return tiny_xl_pipeline(fresh_tokenizer(folder / "1"), copy.deepcopy(clip_l.transformer.text_model).eval(),
                            tokenizer_2, load_hf_text_model(clip_g.model, with_projection=True))


@torch.no_grad()
def test_converted_tower_gives_our_states_and_pooled_vector(ours):
    clip_g = ours.cond_stage_model.embedders[1]
    hf = load_hf_text_model(clip_g.model, with_projection=True)
    ids = clip_g.tokenize(PROMPTS[1:])
    out = hf(ids, output_hidden_states=True)
    states, pooled = tiny_model().cond_stage_model.embedders[1].encode_with_pooled(PROMPTS[1:])
    torch.testing.assert_close(out.hidden_states[-2], states, **TOL)
    torch.testing.assert_close(out.text_embeds, pooled, **TOL)
    plain = load_hf_text_model(clip_g.model)  # CLIPTextModel: SD 2.x's use, ln_final of the last layer
    torch.testing.assert_close(plain(ids).last_hidden_state, clip_g.model(clip_g.token_embedding(ids)), **TOL)


def test_conversion_splits_the_packed_projection(ours):
    tower = ours.cond_stage_model.embedders[1].model
    hf = openclip_text_to_hf(tower.state_dict())
    w = tower.transformer.resblocks[0].attn.in_proj_weight
    q, k, v = (hf[f"text_model.encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), w)
    assert torch.equal(hf["text_projection.weight"], tower.text_projection.t())
    assert not any("logit_scale" in key for key in hf)


@torch.no_grad()
def test_diffusers_load_textual_inversion_gives_our_states(ours, tmp_path):
    manager = ours.embedding_manager
    for p in manager.embedding_parameters():  # trained-looking vectors, away from the init word
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    path = manager.save(tmp_path / "embeddings.safetensors")
    state_dict = load_file(path)
    pipe = diffusers_pipeline(ours, tmp_path)
    pipe.load_textual_inversion(state_dict["clip_l"], token=PLACEHOLDER, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state_dict["clip_g"], token=PLACEHOLDER, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    states, pooled = encode(pipe, PROMPTS)
    batch = {"txt": PROMPTS, **ours.size_batch(2)}
    c = ours.cond_stage_model(batch, embedding_manager=manager)
    torch.testing.assert_close(states, c["crossattn"], **TOL)
    torch.testing.assert_close(pooled, c["vector"][:, :pooled.shape[1]], **TOL)
    init_word = ours.cond_stage_model({**batch, "txt": [p.replace(PLACEHOLDER, "dog dog") for p in PROMPTS]})
    assert (init_word["crossattn"][0] - c["crossattn"][0]).abs().max() > 1e-3  # the trained vectors are used
