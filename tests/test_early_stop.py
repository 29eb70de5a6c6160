"""FitPlateauStop: a TI run ends when its fixed-noise fit to its own images stops improving."""
import os

import pytest
import torch

import train_new
from ldm.callbacks import FitPlateauStop, fit_loss

CONFIG = "configs/tiny/txt2img-tiny-finetune.yaml"


def train(concept, ckpt, logdir, *extra):
    return train_new.main(["--base", CONFIG, "-t", "--actual_resume", ckpt, "-n", "stop", "--data_root", concept,
                           "--init_word", "dog", "--placeholder_string", "*", "-l", str(logdir),
                           "lightning.callbacks.early_stop.target=ldm.callbacks.FitPlateauStop", *extra])


def stop_params(**params):
    """key=value overrides of the early_stop callback's params."""
    return [f"lightning.callbacks.early_stop.params.{k}={v}" for k, v in params.items()]


def test_a_plateau_ends_the_run_as_finished(tiny_concept, ckpt, tmp_path):
    """min_delta 0.99 makes every check after the first a miss: with patience 2 the run ends at the third check."""
    run = train(tiny_concept, ckpt, tmp_path, "lightning.trainer.max_steps=40",
                *stop_params(every_n_steps=3, patience=2, min_delta=0.99, min_steps=0))
    stop = next(cb for cb in run.trainer.callbacks if isinstance(cb, FitPlateauStop))
    assert run.trainer.global_step == 9 and [s for s, _ in stop.history] == [3, 6, 9] and stop.bad_checks == 2
    assert os.path.isfile(os.path.join(run.logdir, "checkpoints", "embeddings.pt"))
    saved = torch.load(os.path.join(run.logdir, "checkpoints", "last.ckpt"), weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "FitPlateauStop" in k)
    assert state["bad_checks"] == 2 and [s for s, _ in state["history"]] == [3, 6, 9]


def test_min_steps_holds_the_stop_back(tiny_concept, ckpt, tmp_path):
    run = train(tiny_concept, ckpt, tmp_path, "lightning.trainer.max_steps=12",
                *stop_params(every_n_steps=2, patience=1, min_delta=0.99, min_steps=10))
    assert run.trainer.global_step == 10


def test_fit_loss_is_fixed_for_fixed_vectors_and_follows_them(tiny_concept, ckpt, tmp_path):
    run = train(tiny_concept, ckpt, tmp_path, "lightning.trainer.max_steps=2")
    model, data = run.model, run.trainer.datamodule.datasets["train"]
    state = torch.get_rng_state()
    first, again = fit_loss(model, data, timesteps=4), fit_loss(model, data, timesteps=4)
    assert first == again and torch.equal(torch.get_rng_state(), state)  # the run's generator is untouched
    with torch.no_grad():
        for p in model.embedding_manager.embedding_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))  # not a constant: LayerNorm
    assert fit_loss(model, data, timesteps=4) != first


@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"patience": 0}, {"min_delta": 1.0}, {"min_steps": -1}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="FitPlateauStop.*use positive counts"):
        FitPlateauStop(**bad)


@pytest.mark.parametrize("model", [object(), type("SDXLLike", (), {"q_sample": 0, "embedding_manager": 0,
                                                                   "conditions_on_size": True})()])
def test_models_without_one_text_context_are_refused(model):
    with pytest.raises(ValueError, match="leave lightning.callbacks.early_stop out"):
        FitPlateauStop().on_fit_start(None, model)
