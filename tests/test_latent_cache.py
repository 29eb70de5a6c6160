"""The latent cache changes speed, not results: same posterior, same draws, same loss curve."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.util import instantiate_from_config

CONFIG = "configs/tiny/txt2img-tiny-finetune.yaml"


def build(fixture_dir, cache):
    config = OmegaConf.load(CONFIG)
    config.model.params.latent_cache = cache
    model = instantiate_from_config(config.model)
    model.load_state_dict(load_file(str(fixture_dir / "state_dict.safetensors")), strict=False)
    return model.train()


def loss_curve(model, images, steps=50, seed=0, keyed=False):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=5e-3)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(images), 2, replace=False)
        batch = {"image": images[idx], "caption": ["a photo of *"] * 2}
        if keyed:  # as the dataset names each image's content
            batch["image_key"] = [f"image {i}" for i in idx]
        loss, _ = model.shared_step(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return np.array(losses)


def test_cached_posterior_equals_the_encoded_one(fixture_dir):
    model = build(fixture_dir, cache=True)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        fresh = torch.cat([model.encode_first_stage(x[i:i + 1]).parameters for i in range(3)])  # one at a time
        model.latent_cache.posterior(x, model.encode_first_stage)
        cached = model.latent_cache.posterior(x, model.encode_first_stage).parameters
    assert model.latent_cache.hits == 3 and model.latent_cache.misses == 3
    assert torch.equal(cached, fresh)


def test_dataset_keys_spare_hashing_and_select_entries(fixture_dir, monkeypatch):
    model = build(fixture_dir, cache=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    monkeypatch.setattr(model.latent_cache, "key", lambda xi: pytest.fail("hashed a keyed image"))
    with torch.no_grad():
        fresh = torch.cat([model.encode_first_stage(x[i:i + 1]).parameters for i in range(2)])  # one at a time
        model.latent_cache.posterior(x, model.encode_first_stage, ["a", "b"])
        swapped = model.latent_cache.posterior(x.flip(0), model.encode_first_stage, ["b", "a"]).parameters
    assert model.latent_cache.hits == 2 and model.latent_cache.misses == 2
    assert torch.equal(swapped, fresh.flip(0))  # whatever batch an image first came in


def test_a_changed_first_stage_empties_the_cache(fixture_dir):
    model = build(fixture_dir, cache=True)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before = model.latent_cache.posterior(x, model.encode_first_stage, ["a"]).parameters
        next(model.first_stage_model.parameters()).mul_(2.0)  # an in-place edit, as loading weights does
        after = model.latent_cache.posterior(x, model.encode_first_stage, ["a"]).parameters
    assert model.latent_cache.misses == 2 and not torch.equal(before, after)
    torch.testing.assert_close(after, model.encode_first_stage(x).parameters, atol=1e-6, rtol=1e-6)


def test_seeded_loss_curve_with_and_without_cache_agrees(fixture_dir):
    g = torch.Generator().manual_seed(1)
    pool = torch.rand(4, 16, 16, 3, generator=g) * 2 - 1
    images = torch.cat([pool, pool.flip(2)])  # an image and its flip, as the dataset's augmentation gives
    with_cache = loss_curve(build(fixture_dir, True), images)
    keyed = loss_curve(build(fixture_dir, True), images, keyed=True)
    without = loss_curve(build(fixture_dir, False), images)
    # the same seed draws the same noise, timesteps and latents: the curves agree to float precision
    np.testing.assert_allclose(with_cache, without, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(keyed, without, rtol=1e-3, atol=1e-4)
    assert with_cache.std() > 0
