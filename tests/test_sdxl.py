"""SDXL base: the released key layout (manifest_sdxl-base.json) and numeric parity with sgm's tiny DiffusionEngine
(conditioner, UNet, DiscreteDenoiser, Euler EDM and DPM++(2M) samplers) at the fixture's tolerances: 1e-5 for single
passes, 2e-4 for the sampler chains (fp32, CPU); textual inversion with one set of vectors per text encoder."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.checkpoints import load_state_dict_into
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import SAMPLERS, ddim_schedule, guided_eps
from ldm.models.diffusion.sigma_sampling import _sigma_grid
from ldm.modules.embedding_formats import EmbeddingFileError
from ldm.modules.embedding_formats_xl import read_xl_embeddings
from ldm.util import instantiate_from_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "sdx_tiny_xl"
MANIFEST = FIXTURES / "manifests" / "manifest_sdxl-base.json"
TOL = dict(atol=1e-5, rtol=1e-5)
CHAIN_TOL = dict(atol=2e-4, rtol=1e-5)
OPTIONAL = ("denoiser.sigmas", "conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
SIZES = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
MANAGER = {"target": "ldm.modules.embedding_manager_xl.SDXLEmbeddingManager",
           "params": {"placeholder_strings": ["*"], "initializer_words": ["dog"]}}


def build_on_meta(config_path):
    with torch.device("meta"):
        return instantiate_from_config(OmegaConf.load(config_path).model)


def tiny_model(personalization=None):
    config = OmegaConf.load(TINY / "config.yaml").model
    if personalization is not None:
        config.params.personalization_config = personalization
    model = instantiate_from_config(config)
    load_state_dict_into(model, str(TINY / "state_dict.safetensors"))
    return model.eval()


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def cases():
    return load_file(str(TINY / "cases.safetensors"))


@pytest.fixture(scope="module")
def prompts():
    return json.loads(json.loads((TINY / "cases_index.json").read_text())["metadata"]["prompts"])


def batch_of(cases, captions):
    return {"txt": captions, **{k: cases[f"in.{k}"] for k in SIZES}}


# ---- the released layout -----------------------------------------------------------------------------------------
def test_inference_config_builds_the_manifest(manifest):
    model = build_on_meta("configs/stable-diffusion/sdxl-inference.yaml")
    sd = model.state_dict()
    expected = {k: v for k, v in manifest["state_dict"].items() if k not in OPTIONAL}
    assert list(sd) == list(expected)  # 2,514 keys in the release file's order
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    for prefix, count in manifest["num_params_by_prefix"].items():  # parameters: every key but the two buffers
        assert sum(v.numel() for k, v in sd.items() if k.startswith(prefix)) == count, prefix
    hp = manifest["hyperparameters"]
    assert model.scale_factor == hp["diffusion_engine"]["scale_factor"]


def test_finetune_config_adds_only_the_embedding(manifest):
    model = build_on_meta("configs/stable-diffusion/sdxl-finetune.yaml")
    extra = set(model.state_dict()) - set(manifest["state_dict"])
    assert extra and all(k.startswith("embedding_manager.") for k in extra)
    assert set(manifest["state_dict"]) - set(model.state_dict()) == set(OPTIONAL)
    assert type(model.embedding_manager).__name__ == "SDXLEmbeddingManager"


def test_release_layout_loads_strictly_with_the_optional_keys(tmp_path):
    sd = load_file(str(TINY / "state_dict.safetensors"))
    assert set(OPTIONAL) <= set(sd)
    model = tiny_model()
    assert set(model.state_dict()) == set(sd) - set(OPTIONAL)
    without = tmp_path / "without_optional.safetensors"
    save_file({k: v for k, v in sd.items() if k not in OPTIONAL}, str(without))
    report = load_state_dict_into(model, str(without))
    assert not report["missing"] and not report["unexpected"]


@pytest.mark.parametrize("key, bad", [(OPTIONAL[0], lambda v: v * 1.001), (OPTIONAL[1], lambda v: v.flip(-1))])
def test_optional_keys_must_equal_the_computed_values(tmp_path, key, bad):
    sd = load_file(str(TINY / "state_dict.safetensors"))
    sd[key] = bad(sd[key]).contiguous()
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=key.rsplit(".", 1)[-1]):
        load_state_dict_into(tiny_model(), str(path))


def test_denoiser_sigmas_are_the_fixtures(tiny, cases):
    assert torch.equal(tiny.denoiser.sigmas, cases["out.denoiser.sigmas"])


# ---- parity with the reference ------------------------------------------------------------------------------------
def test_tokenizers_give_the_reference_ids(tiny, cases, prompts):
    clip_l, clip_g = tiny.cond_stage_model.embedders[:2]
    assert torch.equal(clip_l.tokenize(prompts), cases["in.clip_l.tokens"])
    assert torch.equal(clip_g.tokenize(prompts), cases["in.openclip.tokens"])
    assert torch.equal(clip_g.tokenize(["", ""]), cases["in.openclip.tokens_uc"])


@torch.no_grad()
def test_text_embedders(tiny, cases, prompts):
    clip_l, clip_g = tiny.cond_stage_model.embedders[:2]
    torch.testing.assert_close(clip_l(prompts), cases["out.emb0.crossattn"], **TOL)
    states, pooled = clip_g.encode_with_pooled(prompts)
    torch.testing.assert_close(states, cases["out.emb1.crossattn"], **TOL)
    torch.testing.assert_close(pooled, cases["out.emb1.pooled"], **TOL)


@torch.no_grad()
def test_size_embedders(tiny, cases):
    for i, key in enumerate(SIZES, start=2):
        torch.testing.assert_close(tiny.cond_stage_model.embedders[i](cases[f"in.{key}"]), cases[f"out.emb{i}.vector"],
                                   **TOL)


@torch.no_grad()
@pytest.mark.parametrize("captions, zero, out", [(None, False, "cond"), ("", True, "uc"), ("", False, "uc_nozero")])
def test_conditioner(tiny, cases, prompts, captions, zero, out):
    batch = batch_of(cases, prompts if captions is None else [captions] * 2)
    c = tiny.cond_stage_model(batch, zero_text=zero)
    torch.testing.assert_close(c["crossattn"], cases[f"out.{out}.crossattn"], **TOL)
    torch.testing.assert_close(c["vector"], cases[f"out.{out}.vector"], **TOL)


@torch.no_grad()
def test_model_unconditional_is_sgms(tiny, cases):
    """The sampler's uc: zero text outputs, size embeddings of the image size (here the fixture's sizes)."""
    uc = tiny.unconditional_conditioning(2, latent_size=(1024, 1024))
    assert not uc["crossattn"].any() and not uc["vector"][:, :24].any()
    torch.testing.assert_close(uc["vector"][0], cases["out.uc.vector"][0], **TOL)


@torch.no_grad()
def test_unet(tiny, cases):
    unet = tiny.model.diffusion_model
    hidden = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: hidden.__setitem__(name, out))
             for name, m in unet.named_modules() if name.count(".") == 1 and name.split(".")[0] in
             ("input_blocks", "output_blocks") or name == "middle_block"]
    eps = unet(cases["in.unet.x"], cases["in.unet.timesteps"], context=cases["in.unet.context"], y=cases["in.unet.y"])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(eps, cases["out.unet.eps"], **TOL)
    torch.testing.assert_close(unet.label_emb(cases["in.unet.y"]), cases["out.unet.label_emb"], **TOL)
    names = [k[len("out.unet.hidden."):] for k in cases if k.startswith("out.unet.hidden.")]
    assert names and set(names) == set(hidden)
    for name in names:
        torch.testing.assert_close(hidden[name], cases[f"out.unet.hidden.{name}"], **TOL)


@torch.no_grad()
def test_denoiser(tiny, cases):
    c = {"crossattn": cases["in.unet.context"], "vector": cases["in.unet.y"]}
    sigma = cases["in.denoiser.sigma"]
    assert torch.equal(tiny.denoiser.sigma_to_idx(sigma), cases["out.denoiser.idx"])
    torch.testing.assert_close(tiny.denoiser(tiny, cases["in.denoiser.x"], sigma, c), cases["out.denoiser.denoised"],
                               **TOL)


@torch.no_grad()
@pytest.mark.parametrize("sampler, key", [("euler", "sample_euler"), ("dpmpp_2m_sigma", "sample_dpmpp2m")])
def test_sgm_samplers(tiny, cases, sampler, key):
    sched = ddim_schedule(tiny.alphas_cumprod, 5, 0.0, "legacy")
    torch.testing.assert_close(_sigma_grid(sched)[0], cases["out.discretization.sigmas_5"], **TOL)
    c = {"crossattn": cases["out.cond.crossattn"], "vector": cases["out.cond.vector"]}
    uc = {"crossattn": cases["out.uc.crossattn"], "vector": cases["out.uc.vector"]}
    calls = []
    samples = SAMPLERS[sampler](guided_eps(tiny, c, uc, 5.0), cases["in.sample.randn"], sched,
                                lambda k, x, d: calls.append(d))
    torch.testing.assert_close(samples, cases[f"out.{key}.samples"], **CHAIN_TOL)
    out = cases[f"out.{key}.denoiser_out"]  # the reference's raw uc/c halves; guided = u + 5 (c - u)
    guided = out[:, :2] + 5.0 * (out[:, 2:] - out[:, :2])
    torch.testing.assert_close(torch.stack(calls), guided, **CHAIN_TOL)
    if key == "sample_euler":
        torch.testing.assert_close(tiny.decode_first_stage(samples), cases["out.sample_euler.decoded"], **CHAIN_TOL)


@torch.no_grad()
def test_reference_style_ddim_sampler_takes_the_dict_conditioning(tiny, cases):
    c = {"crossattn": cases["out.cond.crossattn"], "vector": cases["out.cond.vector"]}
    uc = {"crossattn": cases["out.uc.crossattn"], "vector": cases["out.uc.vector"]}
    x_T = cases["in.sample.randn"]
    samples, _ = DDIMSampler(tiny).sample(3, 2, (4, 8, 8), conditioning=c, x_T=x_T, unconditional_guidance_scale=5.0,
                                          unconditional_conditioning=uc)
    expected = SAMPLERS["ddim"](guided_eps(tiny, c, uc, 5.0), x_T, ddim_schedule(tiny.alphas_cumprod, 3))
    assert torch.equal(samples, expected)


@torch.no_grad()
def test_sample_conditions_on_the_sampled_size(tiny, monkeypatch):
    seen = []
    encode = tiny.cond_stage_model.forward
    monkeypatch.setattr(tiny.cond_stage_model, "forward", lambda batch, **kw: seen.append(batch) or encode(batch, **kw))
    images = tiny.sample(["a photo of a dog"], steps=2, scale=5.0)
    assert images.shape == (1, 3, 8, 8) and images.abs().max() <= 1
    assert [b["txt"] for b in seen] == [["a photo of a dog"], [""]]
    assert all(b["target_size_as_tuple"].tolist() == [[8, 8]] for b in seen)  # the tiny autoencoder keeps the size


# ---- textual inversion --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def personal():
    return tiny_model(MANAGER)


def test_one_set_of_vectors_per_encoder_from_its_own_init_word(personal):
    manager = personal.embedding_manager
    for name, encoder in personal.cond_stage_model.text_encoders.items():
        vectors = manager.part(name).string_to_param_dict["*"]
        dog = encoder.token_embedding.weight[encoder.word_token_ids("dog")]
        assert vectors.shape == (1, encoder.token_embedding.embedding_dim)
        torch.testing.assert_close(vectors, dog.mean(0, keepdim=True))


def test_training_step_reaches_both_sets_and_nothing_else(personal):
    personal.train()
    batch = {"image": torch.rand(2, 8, 8, 3) * 2 - 1, "caption": ["a photo of *", "a painting of *"]}
    personal.zero_grad()
    loss, _ = personal.shared_step(batch)
    loss.backward()
    personal.eval()
    grads = [p.grad for p in personal.embedding_manager.embedding_parameters()]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in personal.named_parameters() if not n.startswith("embedding_manager."))


@torch.no_grad()
def test_save_load_round_trip_and_kohya_file(personal, tmp_path):
    manager = personal.embedding_manager
    before = personal.get_learned_conditioning(["a photo of *"])
    written = manager.save(tmp_path / "embeddings.pt")
    assert written.endswith("embeddings.safetensors")
    vectors, placeholder = read_xl_embeddings(written)
    assert placeholder == "*" and {k: v.shape[1] for k, v in vectors.items()} == {"clip_l": 16, "clip_g": 32}
    for p in manager.embedding_parameters():
        p.add_(1.0)
    assert not torch.equal(personal.get_learned_conditioning(["a photo of *"])["crossattn"], before["crossattn"])
    manager.load(written)
    after = personal.get_learned_conditioning(["a photo of *"])
    assert torch.equal(after["crossattn"], before["crossattn"]) and torch.equal(after["vector"], before["vector"])
    kohya = tmp_path / "<xl-toy>.safetensors"  # kohya / A1111: the same dict, no header; the stem is the placeholder
    save_file({k: v * 2 for k, v in vectors.items()}, str(kohya))
    manager.load(str(kohya))
    assert list(manager.string_to_param_dict) == ["<xl-toy>"]
    for name, v in vectors.items():
        torch.testing.assert_close(manager.part(name).string_to_param_dict["<xl-toy>"].detach(), v * 2)
    c = personal.get_learned_conditioning(["a photo of <xl-toy>"])
    assert not torch.equal(c["crossattn"], before["crossattn"])


def test_foreign_files_are_refused(personal, tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"emb_params": torch.zeros(1, 16)}, str(sd1))
    with pytest.raises(EmbeddingFileError, match="clip_l"):
        personal.embedding_manager.load(str(sd1))
    wide = tmp_path / "wide.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(wide))
    with pytest.raises(EmbeddingFileError, match="width 768"):
        personal.embedding_manager.load(str(wide))


def test_the_guided_training_loss_is_refused_for_sdxl():
    """SDXL's shared_step has no unconditional context to guide with: the option is an error, never ignored."""
    config = OmegaConf.load(TINY / "config.yaml").model
    config.params.train_guidance_scale = 3.0
    with pytest.raises(ValueError, match="train_guidance_scale is not supported for SDXL"):
        instantiate_from_config(config)
