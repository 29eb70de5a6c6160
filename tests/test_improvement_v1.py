"""Improvement v1: starts bit-identical to the base conditioner; trains what the config says; saves and loads."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import txt2img
from improvement.v1.post_BERT import PostBERTEmbedder
from ldm.inference import load_model, load_modules
from train_new_v1 import V1

CONFIG = "configs/tiny/txt2img-tiny-finetune.yaml"


def test_v1_starts_bit_identical_to_bert(tiny_bert):
    wrapped = PostBERTEmbedder(n_embed=32, n_layer=2)
    missing, unexpected = wrapped.load_state_dict(tiny_bert.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(PostBERTEmbedder.new_parameter_prefixes) for k in missing)
    captions = ["a photo of a dog", "a red circle in the kitchen"]
    with torch.no_grad():
        assert torch.equal(wrapped.eval()(captions), tiny_bert(captions))


@pytest.fixture(scope="module")
def both(train_tiny, tiny_concept, tmp_path_factory):
    return train_tiny(tiny_concept, tmp_path_factory.mktemp("logs"), "lightning.trainer.max_steps=4", overlays=(V1,))


def test_embedding_and_modules_train_the_rest_stays(both, ckpt):
    model, reference = both.model, load_file(ckpt)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items()), "a base weight changed"
    vector = model.embedding_manager.string_to_param_dict["*"].detach()[0]
    assert not torch.equal(vector, reference["cond_stage_model.transformer.token_emb.weight"][3899])
    assert model.cond_stage_model.adapter.up.weight.abs().sum() > 0
    assert model.cond_stage_model.post_block.ff.net[2].weight.abs().sum() > 0
    groups = both.trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [pytest.approx(5e-3 * 2), 1e-4, 1e-4]  # base lr x batch 2, then modules
    model.train()  # what Lightning calls: only the listed modules follow it
    assert not model.cond_stage_model.transformer.training and not model.model.training
    assert model.cond_stage_model.adapter.training and model.cond_stage_model.post_block.training
    model.eval()


def test_modules_file_beside_the_embedding_loads_back(both, ckpt):
    ckdir = os.path.join(both.logdir, "checkpoints")
    saved = load_file(os.path.join(ckdir, "modules.safetensors"))
    assert saved and all(k.startswith(("cond_stage_model.adapter.", "cond_stage_model.post_block.")) for k in saved)
    assert os.path.exists(os.path.join(ckdir, "modules_gs-4.safetensors"))
    opt = txt2img.get_parser().parse_args(["--config", CONFIG, V1, "--ckpt_path", ckpt, "--device", "cpu",
                                           "--embedding_path", os.path.join(ckdir, "embeddings.pt")])
    state = load_model(opt).state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_modules_of_another_model_are_refused(both, tmp_path):
    bad = tmp_path / "modules.safetensors"
    save_file({"cond_stage_model.adapter.up.weight": torch.zeros(5, 5)}, str(bad))
    with pytest.raises(ValueError, match="holds modules of another model"):
        load_modules(both.model, str(bad))


def test_adapter_only_keeps_the_vector(train_tiny, tiny_concept, ckpt, tmp_path):
    run = train_tiny(tiny_concept, tmp_path, "lightning.trainer.max_steps=4", "model.params.train_embedding=false",
                     overlays=(V1,))
    manager = run.model.embedding_manager
    initial = load_file(ckpt)["cond_stage_model.transformer.token_emb.weight"][3899]
    assert torch.equal(manager.string_to_param_dict["*"].detach()[0], initial)
    assert run.model.cond_stage_model.adapter.up.weight.abs().sum() > 0
    assert len(run.trainer.optimizers[0].param_groups) == 2


def test_modules_train_in_train_mode_from_the_first_step_whether_or_not_images_are_logged(train_tiny, tiny_concept,
                                                                                           tmp_path):
    """The trainable modules are in train mode from step 0 (the frozen encoder around them in eval), not only after
    the first image grid switched modes back: a run that logs images every 2 steps and one that logs none train
    the same vectors and modules, bit for bit."""
    runs = [train_tiny(tiny_concept, tmp_path / name, "lightning.trainer.max_steps=5", extra, overlays=(V1,))
            for name, extra in [("grids", "lightning.callbacks.image_logger.params.batch_frequency=2"),
                                ("none", "lightning.callbacks.image_logger.params.disabled=true")]]
    logged, silent = (run.model for run in runs)
    assert any(f.startswith("samples") for f in os.listdir(tmp_path / "grids" / os.listdir(tmp_path / "grids")[0]
                                                            / "images" / "train"))
    assert silent.cond_stage_model.post_block.training and not silent.cond_stage_model.transformer.training
    vectors = [m.embedding_manager.string_to_param_dict["*"] for m in (logged, silent)]
    assert torch.equal(*vectors)
    for (key, a), b in zip(logged.trainable_module_state().items(), silent.trainable_module_state().values()):
        assert torch.equal(a, b), key
