"""Numeric parity with the reference latent-diffusion code on the tiny fixture model (fp32, CPU)."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import instantiate_from_config

TOL = dict(atol=1e-5, rtol=1e-5)
CHAIN_TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(fixture_dir):
    hp = json.loads((fixture_dir / "hyperparameters.json").read_text())
    model = instantiate_from_config(OmegaConf.create(hp["constructor_arguments"]))
    model.load_state_dict(load_file(str(fixture_dir / "state_dict.safetensors")), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def cases(fixture_dir):
    return load_file(str(fixture_dir / "cases.safetensors"))


def test_unet_eps_and_intermediates(tiny, cases):
    unet = tiny.model.diffusion_model
    hidden = {}
    for name in [f"input_blocks.{i}" for i in range(4)] + ["middle_block"] + [f"output_blocks.{i}" for i in range(4)]:
        unet.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: hidden.__setitem__(name, o))
    with torch.no_grad():
        eps = tiny.apply_model(cases["in.unet.x"], cases["in.unet.timesteps"], cases["in.unet.context"])
    torch.testing.assert_close(eps, cases["out.unet.eps"], **TOL)
    for name, h in hidden.items():
        torch.testing.assert_close(h, cases[f"out.unet.hidden.{name}"], **TOL)


def test_timestep_embedding(tiny, cases):
    from ldm.modules.attention import timestep_embedding

    t_sin = timestep_embedding(cases["in.unet.timesteps"], 32)
    torch.testing.assert_close(t_sin, cases["out.unet.t_sinusoidal"], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(tiny.model.diffusion_model.time_embed(t_sin), cases["out.unet.t_emb"], **TOL)


def test_first_stage(tiny, cases):
    with torch.no_grad():
        post = tiny.encode_first_stage(cases["in.first_stage.image"])
        torch.testing.assert_close(post.parameters, cases["out.first_stage.moments"], **TOL)
        torch.testing.assert_close(post.mean, cases["out.first_stage.posterior_mean"], **TOL)
        torch.testing.assert_close(post.logvar, cases["out.first_stage.posterior_logvar"], **TOL)
        torch.testing.assert_close(post.std, cases["out.first_stage.posterior_std"], **TOL)
        torch.testing.assert_close(tiny.get_first_stage_encoding(post.mode()), cases["out.first_stage.z_scaled_mode"],
                                   **TOL)
        z = cases["in.first_stage.z"]
        torch.testing.assert_close(tiny.first_stage_model.decode(z), cases["out.first_stage.decode"], **TOL)
        torch.testing.assert_close(tiny.decode_first_stage(z), cases["out.first_stage.decode_first_stage"], **TOL)


def test_q_sample(tiny, cases):
    x_t = tiny.q_sample(cases["in.q_sample.x0"], cases["in.q_sample.t"], cases["in.q_sample.noise"])
    torch.testing.assert_close(x_t, cases["out.q_sample.x_t"], atol=1e-6, rtol=0)


def test_ddim_chain(tiny, cases):
    sampler = DDIMSampler(tiny)
    with torch.no_grad():
        samples, inter = sampler.sample(S=5, batch_size=2, shape=(4, 8, 8), conditioning=cases["in.ddim.c"],
                                        eta=0.0, x_T=cases["in.ddim.x_T"], unconditional_guidance_scale=3.0,
                                        unconditional_conditioning=cases["in.ddim.uc"], log_every_t=1)
        decoded = tiny.decode_first_stage(samples)
    torch.testing.assert_close(samples, cases["out.ddim.samples"], **CHAIN_TOL)
    torch.testing.assert_close(torch.stack(inter["x_inter"]), cases["out.ddim.x_inter"], **CHAIN_TOL)
    torch.testing.assert_close(torch.stack(inter["pred_x0"]), cases["out.ddim.pred_x0"], **CHAIN_TOL)
    torch.testing.assert_close(decoded, cases["out.ddim.decoded"], **CHAIN_TOL)


def test_ddim_schedule(tiny, cases):
    from ldm.models.diffusion.sampling import ddim_schedule

    sched = ddim_schedule(tiny.alphas_cumprod, 5)
    assert sched["timesteps"].tolist() == cases["out.ddim.timesteps"].tolist() == [1, 201, 401, 601, 801]
    torch.testing.assert_close(sched["a"].float(), cases["out.ddim.alphas"], atol=1e-7, rtol=0)
    torch.testing.assert_close(sched["a_prev"].float(), cases["out.ddim.alphas_prev"], atol=1e-7, rtol=0)


def test_schedule_buffers_exact(tiny, fixture_dir):
    ref = load_file(str(fixture_dir / "state_dict.safetensors"))
    from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS

    for name in SCHEDULE_BUFFERS:
        assert torch.equal(getattr(tiny, name), ref[name]), name
