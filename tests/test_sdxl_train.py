"""SDXL end to end on the tiny fixture model: train_new.py trains both text encoders' vectors and only them, writes
checkpoints/embeddings.safetensors {"clip_l", "clip_g"}; txt2img.py loads it with --embedding_path and samples."""
import glob
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_new
import txt2img

TINY = Path(__file__).resolve().parent / "fixtures" / "sdx_tiny_xl"
CONFIG, FINETUNE, WEIGHTS = (str(TINY / name) for name in ("config.yaml", "finetune.yaml", "state_dict.safetensors"))


@pytest.fixture(scope="module")
def trained(tiny_concept, tmp_path_factory):
    return train_new.main(["--base", CONFIG, FINETUNE, "-t", "--actual_resume", WEIGHTS, "-n", "xl",
                           "--data_root", tiny_concept, "--init_word", "dog", "--placeholder_string", "*",
                           "-l", str(tmp_path_factory.mktemp("logs")), "lightning.trainer.max_steps=3",
                           "lightning.callbacks.image_logger.params.batch_frequency=1000"])


def test_both_sets_train_and_nothing_else(trained):
    model, reference = trained.model, load_file(WEIGHTS)
    state = model.state_dict()
    for key, value in reference.items():
        if key in state:
            assert torch.equal(state[key].cpu(), value), f"frozen weight {key} changed"
    saved = load_file(os.path.join(trained.logdir, "checkpoints", "embeddings.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"clip_l": (1, 16), "clip_g": (1, 32)}
    for name, encoder in model.cond_stage_model.text_encoders.items():
        dog = encoder.token_embedding.weight[encoder.word_token_ids("dog")].detach().cpu()
        assert not torch.allclose(saved[name], dog), f"the {name} vectors did not move"
    optimised = [id(p) for g in trained.trainer.optimizers[0].param_groups for p in g["params"]]
    assert optimised == [id(p) for p in model.embedding_manager.embedding_parameters()]
    assert not glob.glob(os.path.join(trained.logdir, "checkpoints", "embeddings*.pt"))


def test_txt2img_loads_the_sdxl_embedding(trained, tmp_path):
    emb = os.path.join(trained.logdir, "checkpoints", "embeddings.safetensors")
    written = txt2img.main(["--config", CONFIG, "--ckpt_path", WEIGHTS, "--embedding_path", emb, "--prompt",
                            "a photo of *", "--ddim_steps", "3", "--outdir", str(tmp_path), "--H", "8", "--W", "8",
                            "--n_samples", "2", "--n_iter", "1", "--sampler", "euler"])
    assert len(written) == 2 and all(Image.open(p).size == (8, 8) for p in written)
