"""Stable Diffusion 2.x: the 768-v layout of the released model, and numeric parity with the reference code's tiny
v-model (OpenCLIP penultimate conditioning, UNet with linear projections, v conversions, DDIM on v) at the
tolerances of its fixture: 1e-5 for single passes, 1e-4 for the DDIM chain (fp32, CPU)."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import DEFAULT_SPACING, SAMPLERS, SIGMA_ZERO_SAMPLERS, ddim_schedule, guided_eps
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS, NoiseSchedule, make_beta_schedule, schedule_tensors
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.util import instantiate_from_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "sdx_tiny_v2"
MANIFEST = FIXTURES / "manifests" / "manifest_sd-v2-768-v.json"
TOL = dict(atol=1e-5, rtol=1e-5)
CHAIN_TOL = dict(atol=1e-4, rtol=0)
STAR, EOT = 265, 49407  # '*' and <|endoftext|> in OpenAI's CLIP BPE


def build_on_meta(config_path):
    with torch.device("meta"):
        return instantiate_from_config(OmegaConf.load(config_path).model)


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def tiny():
    model = instantiate_from_config(OmegaConf.load(TINY / "config.yaml").model)
    model.load_state_dict(load_file(str(TINY / "state_dict.safetensors")), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def cases():
    return load_file(str(TINY / "cases.safetensors"))


@pytest.fixture(scope="module")
def prompts():
    return json.loads(json.loads((TINY / "cases_index.json").read_text())["metadata"]["prompts"])


# ---- the released layout -----------------------------------------------------------------------------------------
def test_768_v_config_builds_the_manifest(manifest):
    model = build_on_meta("configs/stable-diffusion/v2-inference-v.yaml")
    sd = model.state_dict()
    assert list(sd) == list(manifest["state_dict"])  # same 1,240 keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == manifest["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    for prefix, count in manifest["num_params_by_prefix"].items():
        assert sum(p.numel() for k, p in model.named_parameters() if k.startswith(prefix)) == count, prefix
    hp = manifest["hyperparameters"]
    assert model.parameterization == hp["latent_diffusion"]["parameterization"] == "v"
    assert model.scale_factor == hp["latent_diffusion"]["scale_factor"]
    assert model.cond_stage_model.layer_idx == hp["cond_stage"]["layer_idx"]


def test_512_config_is_the_same_layout_predicting_eps(manifest):
    model = build_on_meta("configs/stable-diffusion/v2-inference.yaml")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest["state_dict"]
    assert model.parameterization == "eps"


def test_finetune_config_adds_only_the_embedding(manifest):
    model = build_on_meta("configs/stable-diffusion/v2-finetune.yaml")
    extra = set(model.state_dict()) - set(manifest["state_dict"])
    assert extra and all(k.startswith("embedding_manager.") for k in extra)
    assert set(manifest["state_dict"]) <= set(model.state_dict())
    assert model.parameterization == "v" and int(model.embedding_manager.string_to_token_dict["*"]) == STAR


def test_schedule_spot_values_and_buffers_are_exact(manifest):
    spots = manifest["schedule_spot_values"]
    tensors = schedule_tensors(make_beta_schedule("linear", 1000, 0.00085, 0.012), parameterization="v")
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        assert tensors[name].float()[spots["indices"]].tolist() == spots[name], name
    reference = load_file(str(TINY / "state_dict.safetensors"))
    for name in SCHEDULE_BUFFERS:
        assert torch.equal(tensors[name].float(), reference[name]), name


# ---- the tiny reference model ------------------------------------------------------------------------------------
def test_tiny_config_has_the_fixture_sizes(tiny):
    hp = json.loads((TINY / "hyperparameters.json").read_text())
    for prefix, count in hp["state_dict"]["num_params_by_prefix"].items():
        assert sum(p.numel() for k, p in tiny.named_parameters() if k.startswith(prefix)) == count, prefix
    assert len(tiny.state_dict()) == hp["state_dict"]["num_keys"]


def test_openclip_tokens_are_zero_padded(tiny, cases, prompts):
    encoder = tiny.cond_stage_model
    assert torch.equal(encoder.tokenize(prompts), cases["in.openclip.tokens"])
    assert torch.equal(encoder.tokenize(["", ""]), cases["in.openclip.tokens_uc"])
    long = encoder.tokenize(["word " * 200])[0]
    assert long.shape == (77,) and long[-1] == EOT and (long != 0).all()  # truncated: the last id is <|endoftext|>


def test_openclip_penultimate_conditioning(tiny, cases, prompts):
    blocks = tiny.cond_stage_model.model.transformer.resblocks
    outputs = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o)) for k, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            c = tiny.get_learned_conditioning(prompts)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(outputs) == [0, 1]  # penultimate: the last of the 3 blocks never runs
    for k in (0, 1):
        torch.testing.assert_close(outputs[k], cases[f"out.openclip.resblock_out.{k}"], **TOL)
    torch.testing.assert_close(c, cases["out.cond.c"], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(tiny.get_learned_conditioning(["", ""]), cases["out.cond.uc"], **TOL)
        tower = tiny.cond_stage_model.model
        embed_in = tower.token_embedding(cases["in.openclip.tokens"]) + tower.positional_embedding
        torch.testing.assert_close(embed_in, cases["out.openclip.embed_in"], **TOL)


def test_openclip_last_layer(tiny, cases, prompts):
    last = FrozenOpenCLIPEmbedder(text_config=dict(width=32, heads=2, layers=3, embed_dim=32), layer="last")
    last.load_state_dict(tiny.cond_stage_model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(last.encode(prompts), cases["out.openclip.last_layer_ln_final"], **TOL)


def test_unet_v_and_intermediates(tiny, cases):
    unet = tiny.model.diffusion_model
    names = [f"input_blocks.{i}" for i in range(6)] + ["middle_block"] + [f"output_blocks.{i}" for i in range(6)]
    hidden = {}
    hooks = [unet.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hidden.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad():
            v = tiny.apply_model(cases["in.unet.x"], cases["in.unet.timesteps"], cases["in.unet.context"])
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(v, cases["out.unet.v"], **TOL)
    for name in names:
        torch.testing.assert_close(hidden[name], cases[f"out.unet.hidden.{name}"], **TOL)


def test_timestep_embedding(tiny, cases):
    from ldm.modules.attention import timestep_embedding

    t_sin = timestep_embedding(cases["in.unet.timesteps"], 32)
    torch.testing.assert_close(t_sin, cases["out.unet.t_sinusoidal"], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(tiny.model.diffusion_model.time_embed(t_sin), cases["out.unet.t_emb"], **TOL)


def test_v_conversions(tiny, cases):
    x, t, v = cases["in.unet.x"], cases["in.unet.timesteps"], cases["out.unet.v"]
    torch.testing.assert_close(tiny.predict_eps_from_z_and_v(x, t, v), cases["out.unet.eps_from_v"], **TOL)
    torch.testing.assert_close(tiny.predict_start_from_z_and_v(x, t, v), cases["out.unet.x0_from_v"], **TOL)
    x0, noise, t = cases["in.q_sample.x0"], cases["in.q_sample.noise"], cases["in.q_sample.t"]
    torch.testing.assert_close(tiny.q_sample(x0, t, noise), cases["out.q_sample.x_t"], **TOL)
    torch.testing.assert_close(tiny.get_v(x0, noise, t), cases["out.q_sample.v_target"], **TOL)


def test_ddim_schedule(tiny, cases):
    sched = ddim_schedule(tiny.alphas_cumprod, 5)
    assert sched["timesteps"].tolist() == cases["out.ddim.timesteps"].tolist() == [1, 201, 401, 601, 801]
    torch.testing.assert_close(sched["a"].float(), cases["out.ddim.alphas"], atol=0, rtol=0)
    torch.testing.assert_close(sched["a_prev"].float(), cases["out.ddim.alphas_prev"], atol=0, rtol=0)


def test_ddim_chain_on_v(tiny, cases):
    with torch.no_grad():
        samples, inter = DDIMSampler(tiny).sample(
            S=5, batch_size=2, shape=(4, 8, 8), conditioning=cases["in.ddim.c"], eta=0.0, x_T=cases["in.ddim.x_T"],
            unconditional_guidance_scale=5.0, unconditional_conditioning=cases["in.ddim.uc"], log_every_t=1)
        decoded = tiny.decode_first_stage(samples)
    torch.testing.assert_close(samples, cases["out.ddim.samples"], **CHAIN_TOL)
    torch.testing.assert_close(torch.stack(inter["x_inter"]), cases["out.ddim.x_inter"], **CHAIN_TOL)
    torch.testing.assert_close(torch.stack(inter["pred_x0"]), cases["out.ddim.pred_x0"], **CHAIN_TOL)
    torch.testing.assert_close(decoded, cases["out.ddim.decoded"], **CHAIN_TOL)


def test_first_stage(tiny, cases):
    with torch.no_grad():
        posterior = tiny.encode_first_stage(cases["in.first_stage.image"])
        z = tiny.get_first_stage_encoding(posterior.mode())
    torch.testing.assert_close(posterior.mean, cases["out.first_stage.posterior_mean"], **TOL)
    torch.testing.assert_close(posterior.logvar, cases["out.first_stage.posterior_logvar"], **TOL)
    torch.testing.assert_close(z, cases["out.first_stage.z_scaled_mode"], **TOL)


def test_training_loss_targets_v(tiny, cases):
    z0, noise, t = cases["in.q_sample.x0"], cases["in.q_sample.noise"], cases["in.q_sample.t"]
    c = cases["in.unet.context"][:1].expand(len(t), -1, -1)
    with torch.no_grad():
        _, logs = tiny.p_losses(z0, c, t, noise)
        v = tiny.apply_model(cases["out.q_sample.x_t"], t, c)
    torch.testing.assert_close(logs["loss_simple"], (v - cases["out.q_sample.v_target"]).square().mean(), **TOL)


# ---- samplers on a v-model ---------------------------------------------------------------------------------------
class PointDataV(NoiseSchedule):
    """The exact v-model of data that is one point x0: eps is read off x_t, v = sqrt(ac) eps - sqrt(1 - ac) x0."""

    def __init__(self, x0):
        super().__init__()
        self.register_schedule(linear_start=0.00085, linear_end=0.012, parameterization="v")
        self.x0 = x0

    def apply_model(self, x_t, t, c):
        x0 = self.x0.expand_as(x_t)
        a, s = self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1), self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        return self.get_v(x0, (x_t - a * x0) / s, t)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samplers_follow_the_exact_v_model(sampler):
    """With the exact model every eps estimate is the start's eps, so each sampler ends at
    sqrt(ac[0]) x0 + sqrt(1 - ac[0]) eps_T; reading v as eps would end elsewhere."""
    torch.manual_seed(0)
    x0, x_T = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    model = PointDataV(x0)
    c, uc = torch.randn(2, 77, 8), torch.randn(2, 77, 8)
    sched = ddim_schedule(model.alphas_cumprod, 10, spacing=DEFAULT_SPACING[sampler])
    out = SAMPLERS[sampler](guided_eps(model, c, uc, 5.0), x_T, sched)
    ac = model.alphas_cumprod.double()
    a_T = ac[sched["timesteps"][-1]]
    eps_T = (x_T.double() - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    expected = ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * eps_T
    if sampler in SIGMA_ZERO_SAMPLERS:  # sgm's samplers end at sigma 0: the exact model's x0
        expected = x0.double().expand_as(expected)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


# ---- textual inversion through the OpenCLIP seam -----------------------------------------------------------------
@pytest.fixture()
def manager(tiny):
    manager = EmbeddingManager(tiny.cond_stage_model, ["*"], ["sculpture"])
    with torch.no_grad():
        manager.string_to_param_dict["*"].normal_()
    return manager


def test_manager_swaps_only_the_placeholder(tiny, manager):
    encoder, prompt = tiny.cond_stage_model, ["a photo of * next to a *"]
    tokens = encoder.tokenize(prompt)
    with torch.no_grad():
        embeds = manager.input_seam(tokens.clone(), encoder.token_embedding)
        changed = (embeds != encoder.token_embedding(tokens)).any(-1)
        states, plain = encoder.encode(prompt, embedding_manager=manager), encoder.encode(prompt)
    assert torch.equal(changed, tokens == STAR) and changed.sum() == 2
    first = int((tokens[0] == STAR).nonzero()[0])
    torch.testing.assert_close(states[:, :first], plain[:, :first], atol=1e-6, rtol=0)  # causal: the prefix stays
    assert not torch.allclose(states[:, first], plain[:, first])


def test_gradients_reach_only_the_vectors(tiny, manager):
    encoder = tiny.cond_stage_model
    encoder.train()  # a frozen encoder stays in eval mode
    encoder(["a photo of *"], embedding_manager=manager).square().sum().backward()
    assert not encoder.training
    assert all(p.grad is None for p in encoder.parameters())
    assert manager.embedding_parameters()[0].grad.abs().sum() > 0


def test_ti_training_step_on_the_v_model(cases):
    """The v loss of a TI step reaches only the vectors: UNet, first stage and OpenCLIP tower get no gradient."""
    config = OmegaConf.load(TINY / "config.yaml").model
    config.params.personalization_config = {"target": "ldm.modules.embedding_manager.EmbeddingManager",
                                            "params": {"placeholder_strings": ["*"], "initializer_words": ["toy"]}}
    model = instantiate_from_config(config)
    missing, unexpected = model.load_state_dict(load_file(str(TINY / "state_dict.safetensors")), strict=False)
    assert not unexpected and missing and all(k.startswith("embedding_manager.") for k in missing)
    model.train()
    c = model.get_learned_conditioning(["a photo of *"] * 4)
    loss, _ = model.p_losses(cases["in.q_sample.x0"], c, cases["in.q_sample.t"], cases["in.q_sample.noise"])
    loss.backward()
    vectors = model.embedding_manager.embedding_parameters()
    assert vectors[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if all(p is not v for v in vectors))


def test_pretrained_tag_is_one_clear_line():
    with pytest.raises(ValueError, match="version 'laion2b_s32b_b79k' names open_clip weights") as info:
        FrozenOpenCLIPEmbedder(version="laion2b_s32b_b79k")
    assert "\n" not in str(info.value)
