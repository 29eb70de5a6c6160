"""Shapes of each module, and samplers checked against a closed form."""
import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL, VQModel
from ldm.models.diffusion.sampling import (
    ddim_schedule,
    ddim_timesteps,
    logsnr_timesteps,
    sample_ddim,
    sample_dpmpp_2m,
    sample_plms,
)
from ldm.models.diffusion.schedule import make_beta_schedule, schedule_tensors
from ldm.modules.diffusionmodules.openaimodel import UNetModel

DD = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
          num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def test_autoencoder_kl_shapes():
    ae = AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=4)
    x = torch.randn(2, 3, 32, 32)
    post = ae.encode(x)
    assert post.mean.shape == (2, 4, 8, 8) and ae.decode(post.sample()).shape == (2, 3, 32, 32)


def test_vq_model_shapes():
    vq = VQModel({**DD, "double_z": False}, {"target": "torch.nn.Identity"}, n_embed=16, embed_dim=4)
    h = vq.encode(torch.randn(2, 3, 32, 32))
    z_q, loss, idx = vq.quantize_latents(h)
    assert h.shape == z_q.shape == (2, 4, 8, 8) and idx.shape == (2, 8, 8) and loss.dim() == 0
    assert vq.decode_indices(idx).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("legacy", [False, True])
def test_unet_shapes(legacy):
    unet = UNetModel(8, 4, 32, 4, 1, [1, 2], channel_mult=[1, 2], num_heads=4, context_dim=16, legacy=legacy)
    eps = unet(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), context=torch.randn(3, 7, 16))
    assert eps.shape == (3, 4, 8, 8)


def test_unet_rejects_options_it_does_not_build():
    with pytest.raises(NotImplementedError, match="use_scale_shift_norm"):
        UNetModel(8, 4, 32, 4, 1, [1], channel_mult=[1], num_heads=4, context_dim=16, use_scale_shift_norm=True)


@pytest.mark.parametrize("sampler", [sample_ddim, sample_plms, sample_dpmpp_2m])
def test_zero_eps_sampling_follows_the_closed_form(sampler):
    """With eps = 0 each step scales x by sqrt(a_prev / a): the chain telescopes."""
    ac = schedule_tensors(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"].float()
    sched = ddim_schedule(ac, 10)
    x_T = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    x0 = sampler(lambda x, t: torch.zeros_like(x), x_T, sched)
    expected = x_T * (sched["a_prev"][0] / sched["a"][-1]).sqrt()
    torch.testing.assert_close(x0, expected, rtol=1e-10, atol=1e-10)


def test_samplers_are_deterministic():
    ac = schedule_tensors(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"].float()
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    eps_fn = lambda x, t: net(x) * (t.float()[:, None, None, None] / 1000)  # noqa: E731
    x_T = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for sampler in (sample_ddim, sample_plms, sample_dpmpp_2m):
            a, b = sampler(eps_fn, x_T, ddim_schedule(ac, 7)), sampler(eps_fn, x_T, ddim_schedule(ac, 7))
            assert torch.equal(a, b)
        g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        s = ddim_schedule(ac, 7, eta=1.0)
        assert torch.equal(sample_ddim(eps_fn, x_T, s, generator=g()), sample_ddim(eps_fn, x_T, s, generator=g()))


def test_logsnr_timesteps_are_distinct_and_evenly_spaced_in_log_snr():
    ac = schedule_tensors(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"].double()
    lam = 0.5 * (ac / (1 - ac)).log()
    for steps in (2, 20, 50, 999):
        ts = logsnr_timesteps(ac, steps)
        assert len(ts) == steps and ts[0] == 1 and ts[-1] == 999 and (ts.diff() > 0).all()
    strides = -lam[logsnr_timesteps(ac, 20)].diff()
    assert strides[3:].max() / strides[3:].min() < 1.2  # even, bar the first strides near t = 0 (integer t)
    with pytest.raises(ValueError, match="unknown timestep spacing 'cosine'"):
        ddim_schedule(ac, 20, spacing="cosine")


def test_dpm_solver_on_logsnr_steps_solves_the_flow_of_gaussian_data():
    """Data N(mu, s^2): the exact eps is known and the probability-flow ODE keeps the standardised value of x_t,
    so every sampler's x_0 can be checked against the exact one. DPM-Solver++ in 20 log-SNR steps must be far
    closer than DDIM in 50 of the reference's steps (and than itself on those uniform steps)."""
    ac = schedule_tensors(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"].double()
    mu, s = 0.7, 0.2

    def eps_fn(x, t):
        a = ac[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    x_T = torch.randn(64, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def error(sampler, steps, spacing):
        sched = ddim_schedule(ac, steps, spacing=spacing)
        a_T, a_0 = sched["a"][-1], sched["a_prev"][0]
        exact = a_0.sqrt() * mu + (x_T - a_T.sqrt() * mu) * ((a_0 * s * s + 1 - a_0) / (a_T * s * s + 1 - a_T)).sqrt()
        return (sampler(eps_fn, x_T, sched) - exact).abs().max().item()

    dpm20 = error(sample_dpmpp_2m, 20, "logsnr")
    assert dpm20 < error(sample_ddim, 50, "uniform") / 10 and dpm20 < error(sample_dpmpp_2m, 20, "uniform") / 5


def test_ddim_timesteps_follow_the_reference_and_stay_in_range():
    assert ddim_timesteps(1000, 50).tolist() == list(range(1, 1000, 20))
    assert ddim_timesteps(1000, 3).tolist() == [1, 334, 667]  # the reference's list also holds 1000
    assert len(ddim_timesteps(1000, 30)) == 31  # 1000 // 30 = 33 does not divide 1000: as the reference
    for steps in (1, 3, 7, 30, 999, 1000):
        ts = ddim_timesteps(1000, steps)
        assert 0 < ts.min() and ts.max() < 1000 and (ts.diff() > 0).all()


class _UNetHolder(torch.nn.Module):
    """The one method of a LatentDiffusion model that guided_eps calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.unet = UNetModel(8, 4, 32, 4, 1, [1, 2], channel_mult=[1, 2], num_heads=4, context_dim=16)
        for p in self.unet.parameters():  # proj_out is zero-initialised: give the transformers a say
            p.data.normal_(0, 0.2)

    def apply_model(self, x, t, c):
        return self.unet(x, t, context=c)


def test_guided_eps_projects_the_context_once_and_changes_nothing():
    from ldm.models.diffusion.sampling import guided_eps
    from ldm.modules.attention import CrossAttention

    model = _UNetHolder().eval()
    c, uc = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    cross = [m for m in model.modules() if isinstance(m, CrossAttention) and m.to_k.in_features == 16]
    calls = []
    for m in cross:
        m.to_k.register_forward_hook(lambda *_: calls.append(1))
    ac = schedule_tensors(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"].float()
    x_T = torch.randn(2, 4, 8, 8)

    def fresh_each_step(x, t):
        e_uc, e_c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uc, c])).chunk(2)
        return e_uc + 3.0 * (e_c - e_uc)

    with torch.no_grad():
        expected = sample_ddim(fresh_each_step, x_T, ddim_schedule(ac, 5))
        assert len(calls) == 5 * len(cross)
        calls.clear()
        got = sample_ddim(guided_eps(model, c, uc, 3.0), x_T, ddim_schedule(ac, 5))
    assert len(calls) == len(cross) > 0  # keys of each cross-attention layer computed once, not per step
    assert torch.equal(got, expected)
    calls.clear()
    eps_fn = guided_eps(model, c, uc, 3.0)
    eps_fn(x_T, torch.tensor([10, 10])).sum()
    eps_fn(x_T, torch.tensor([10, 10])).sum()  # with autograd on nothing is kept between calls
    assert len(calls) == 2 * len(cross)
