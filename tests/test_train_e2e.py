"""End to end: train_new.py trains only the embedding, writes the run folder, resumes; txt2img.py samples."""
import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_new
import txt2img

CONFIG = "configs/tiny/txt2img-tiny-finetune.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept")
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = np.zeros((20, 20, 3), np.uint8)
        arr[4:16, 4:16] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return str(folder)


def train_args(images, ckpt, logdir, *extra):
    return ["--base", CONFIG, "-t", "--actual_resume", ckpt, "-n", "test", "--data_root", images,
            "--init_word", "dog", "--placeholder_string", "*", "-l", str(logdir), *extra]


@pytest.fixture(scope="module")
def trained(images, ckpt, tmp_path_factory):
    return train_new.main(train_args(images, ckpt, tmp_path_factory.mktemp("logs")))


def test_only_the_embedding_trains(trained, ckpt):
    model = trained.model
    reference = load_file(ckpt)
    state = model.state_dict()
    for key, value in reference.items():
        assert torch.equal(state[key], value), f"frozen weight {key} changed"
    vector = model.embedding_manager.string_to_param_dict["*"]
    initial = reference["cond_stage_model.transformer.token_emb.weight"][3899]  # "dog"
    assert not torch.allclose(vector.detach()[0], initial), "the placeholder vector did not move"
    optimizer_params = [p for g in trained.trainer.optimizers[0].param_groups for p in g["params"]]
    assert [id(p) for p in optimizer_params] == [id(p) for p in model.embedding_manager.embedding_parameters()]
    for frozen in (model.model, model.first_stage_model, model.cond_stage_model):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_run_folder(trained):
    d = trained.logdir
    assert os.path.basename(d).startswith("concept") and d.endswith("_test")
    for pattern in ("configs/*-project.yaml", "configs/*-lightning.yaml", "checkpoints/embeddings_gs-10.pt",
                    "checkpoints/embeddings_gs-20.pt", "checkpoints/embeddings.pt", "checkpoints/last.ckpt",
                    "images/train/samples_gs-000020_e-*_b-*.png", "images/train/inputs_gs-000010_*.png",
                    "metrics.csv", "loss.png"):
        assert glob.glob(os.path.join(d, pattern)), pattern
    saved = torch.load(os.path.join(d, "checkpoints", "embeddings.pt"), weights_only=True)
    assert set(saved) == {"string_to_token", "string_to_param"}
    assert saved["string_to_param"]["*"].shape == (1, 32)
    assert not glob.glob(os.path.join(d, "**", ".tmp-*"), recursive=True)


def test_resume_continues_the_step_count(trained, images, ckpt):
    saved = torch.load(os.path.join(trained.logdir, "checkpoints", "embeddings.pt"), weights_only=True)
    restored = train_new.main(["-r", trained.logdir, "-t", "lightning.trainer.max_steps=20"])
    assert restored.trainer.global_step == 20
    assert torch.equal(restored.model.embedding_manager.string_to_param_dict["*"].detach(),
                       saved["string_to_param"]["*"])
    assert restored.trainer.optimizers[0].state, "optimizer state was not restored"
    resumed = train_new.main(["-r", trained.logdir, "-t", "lightning.trainer.max_steps=30"])
    assert resumed.logdir == trained.logdir
    assert resumed.trainer.global_step == 30
    assert os.path.exists(os.path.join(trained.logdir, "checkpoints", "embeddings_gs-30.pt"))
    moved = resumed.model.embedding_manager.string_to_param_dict["*"].detach()
    assert not torch.equal(moved, saved["string_to_param"]["*"])  # it trained on from the saved vector


def test_txt2img_with_the_learned_embedding(trained, ckpt, tmp_path, caplog):
    emb = os.path.join(trained.logdir, "checkpoints", "embeddings.pt")
    written = txt2img.main(["--config", CONFIG, "--ckpt_path", ckpt, "--embedding_path", emb, "--prompt",
                            "a photo of *", "--ddim_steps", "5", "--outdir", str(tmp_path), "--H", "16", "--W", "16",
                            "--n_samples", "2", "--n_iter", "1", "--scale", "3.0"])
    assert len(written) == 2 and all(Image.open(p).size == (16, 16) for p in written)
    assert glob.glob(str(tmp_path / "a-photo-of-star-*.png"))
    txt2img.main(["--config", CONFIG, "--ckpt_path", ckpt, "--embedding_path", emb, "--prompt", "a photo of a dog",
                  "--ddim_steps", "2", "--outdir", str(tmp_path), "--H", "16", "--W", "16", "--n_samples", "1"])
    assert "does not contain the learned placeholder" in caplog.text


def test_embedding_changes_the_conditioning_only_through_the_placeholder(trained):
    model = trained.model
    with torch.no_grad():
        with_emb = model.get_learned_conditioning(["a photo of *"])
        manager, model.embedding_manager = model.embedding_manager, None
        without = model.get_learned_conditioning(["a photo of *"])
        model.embedding_manager = manager
    assert not torch.allclose(with_emb, without)


def test_the_regulariser_pulls_the_vector_towards_its_init_word(trained):
    """embedding_reg_weight w adds w ||v - v0||^2 to the loss, so its gradient is 2 w (v - v0)."""
    model = trained.model
    vector, initial = model.embedding_manager.string_to_param_dict["*"], model.embedding_manager.initial_embeddings["*"]
    distance = ((vector - initial) ** 2).sum().item()
    assert distance > 0, "the trained vector is still at its init word"
    saved_weight, model.embedding_reg_weight = model.embedding_reg_weight, 0.5
    try:
        loss, logs = model.add_embedding_regulariser(torch.tensor(1.0), {})
        assert loss.item() == pytest.approx(1.0 + 0.5 * distance, rel=1e-5)
        assert logs["loss_embedding_reg"].item() == pytest.approx(distance, rel=1e-5)
        vector.grad = None
        loss.backward()
        torch.testing.assert_close(vector.grad, (vector - initial).detach())
    finally:
        model.embedding_reg_weight, vector.grad = saved_weight, None


@pytest.mark.parametrize("placeholder", ["*", "<my-thing>"])
def test_the_vector_starts_from_the_loaded_checkpoint(ckpt, placeholder):
    """The init word's row of the *pretrained* text encoder, not of the randomly initialised one."""
    from omegaconf import OmegaConf

    from load import load_model_from_config

    config = OmegaConf.load(CONFIG)
    config.model.params.personalization_config.params.placeholder_strings = [placeholder]
    model = load_model_from_config(config, ckpt)
    vector = model.embedding_manager.string_to_param_dict[placeholder].detach()[0]
    dog = load_file(ckpt)["cond_stage_model.transformer.token_emb.weight"][3899]
    assert torch.equal(vector, dog)
    if placeholder != "*":
        assert model.embedding_manager(torch.tensor(model.cond_stage_model.tokenize([f"a {placeholder}"])),
                                       torch.zeros(1, 77, 32)).abs().sum() > 0


def test_train_timesteps_limits_the_drawn_t(trained, monkeypatch):
    """model.params.train_timesteps=[lo, hi] draws every training t from [lo, hi); the default, all of them."""
    model = trained.model
    assert model.train_timesteps == (0, model.num_timesteps)
    drawn = []
    monkeypatch.setattr(model, "p_losses", lambda z0, c, t, uc=None: (drawn.append(t) or torch.tensor(0.0), {}))
    monkeypatch.setattr(model, "train_timesteps", (400, 1000))
    batch = next(iter(trained.trainer.datamodule.train_dataloader()))
    for _ in range(20):
        model.shared_step(batch)
    t = torch.cat(drawn)
    assert t.min() >= 400 and t.max() < 1000 and t.unique().numel() > 10


def test_train_timesteps_p_mixes_the_range_with_all_timesteps(trained, monkeypatch):
    """train_timesteps_p=0.5: half the draws from [400, 1000), half from all t, so 0.5 x 0.4 of them below 400."""
    model = trained.model
    monkeypatch.setattr(model, "train_timesteps", (400, 1000))
    monkeypatch.setattr(model, "train_timesteps_p", 0.5)
    torch.manual_seed(0)
    t = model.draw_timesteps(20000, "cpu")
    assert 0.19 < (t < 400).float().mean().item() < 0.21 and t.min() >= 0 and t.max() < 1000


def test_train_guidance_scale_fits_the_guided_output(trained, monkeypatch):
    """train_guidance_scale=w: the loss is on o_uc + w (o_c - o_uc), o_uc that of the empty prompt, no gradient."""
    model = trained.model
    assert model.train_guidance_scale == 1.0 and model.training_uc(2) is None
    z0, t, noise = torch.randn(2, 4, 8, 8), torch.tensor([100, 700]), torch.randn(2, 4, 8, 8)
    monkeypatch.setattr(model, "train_guidance_scale", 3.0)
    with torch.no_grad():
        c, uc = model.get_learned_conditioning(["a photo of *", "a *"]), model.training_uc(2)
        x_t = model.q_sample(z0, t, noise)
        guided = model.apply_model(x_t, t, uc) + 3.0 * (model.apply_model(x_t, t, c) - model.apply_model(x_t, t, uc))
        expected = ((guided - noise) ** 2).mean()
        loss, _ = model.p_losses(z0, c, t, noise, uc=uc)
    assert torch.allclose(loss, expected, atol=1e-6) and not torch.allclose(loss, model.p_losses(z0, c, t, noise)[0])
    assert not uc.requires_grad


@pytest.mark.parametrize("bad", [0.5, "3", True])
def test_train_guidance_scale_below_one_is_refused(bad):
    from ldm.models.diffusion.ddpm import _guidance_scale
    with pytest.raises(ValueError, match="train_guidance_scale=.*use 1"):
        _guidance_scale(bad)


def test_cosine_lr_decay_reaches_zero_at_max_steps(images, ckpt, tmp_path):
    """model.params.lr_decay=cosine: the logged rate starts at the base rate and falls to 0 by the last step."""
    run = train_new.main(train_args(images, ckpt, tmp_path, "model.params.lr_decay=cosine",
                                    "lightning.trainer.max_steps=8"))
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 8 and scheduler.get_last_lr()[0] == 0.0
    assert scheduler.base_lrs[0] == run.model.learning_rate > 0


def test_unknown_lr_decay_is_refused():
    from ldm.models.textual_inversion import check_lr_decay
    with pytest.raises(ValueError, match="lr_decay='linear'.*none, cosine"):
        check_lr_decay("linear")


@pytest.mark.parametrize("bad", [[500, 400], [-1, 10], [0, 1001]])
def test_train_timesteps_outside_the_schedule_is_refused(bad):
    from ldm.models.diffusion.ddpm import _timestep_range
    with pytest.raises(ValueError, match=r"train_timesteps=.*give \[lo, hi\]"):
        _timestep_range(bad, 1000)
