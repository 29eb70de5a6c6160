"""embedding_ema: a TI run saves (and logs images with) a moving average of its vectors, LitEma's warm-up, and the
average travels in last.ckpt (the fault-injection test resumes such a run bit-identically)."""
import glob
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.embedding_ema import VectorEMA, check_decay
from load import load_model_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "models/ldm/tiny-shapes"


@pytest.fixture()
def ti_model():
    config = OmegaConf.merge(OmegaConf.load(f"{MODEL}/config.yaml"),
                             OmegaConf.load("configs/tiny-shapes/finetune.yaml"),
                             OmegaConf.from_dotlist(["model.params.embedding_ema=0.999"]))
    return load_model_from_config(config, f"{MODEL}/model.safetensors")


def test_average_follows_the_warm_up_and_applies_without_trace(ti_model):
    manager = ti_model.embedding_manager
    (p,) = manager.embedding_parameters()
    ema = VectorEMA(manager, 0.999)
    steps = [p.detach() + torch.randn_like(p) for _ in range(5)]
    want = p.detach().clone()
    for n, value in enumerate(steps, 1):
        with torch.no_grad():
            p.copy_(value)
        ema.update(manager)
        d = min(0.999, (1 + n) / (10 + n))
        want = d * want + (1 - d) * value
    assert int(ema.num_updates) == 5
    torch.testing.assert_close(ema.shadow_0, want)
    last = p.detach().clone()
    with ema.applied(manager):
        assert torch.equal(p, ema.shadow_0) and not torch.equal(p, last)
    assert torch.equal(p, last)  # the trained vectors come back bit for bit


def test_the_model_averages_after_each_optimizer_step(ti_model):
    assert ti_model.embedding_ema == 0.999 and ti_model.vector_ema is not None
    (p,) = ti_model.embedding_manager.embedding_parameters()
    start = p.detach().clone()
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.ones_like(p)
    opt.step()
    ti_model.vector_ema.update(ti_model.embedding_manager)
    with ti_model.averaged_vectors():
        averaged = p.detach().clone()
    torch.testing.assert_close(averaged, start + (1 - 2 / 11) * (p.detach() - start))
    assert "vector_ema.shadow_0" in ti_model.state_dict()


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.9", True])
def test_a_decay_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="embedding_ema=.* is not a decay"):
        check_decay(bad)


def test_off_by_default_and_for_pretraining():
    assert check_decay(0) == 0.0
    config = OmegaConf.merge(OmegaConf.load(f"{MODEL}/config.yaml"),
                             OmegaConf.load("configs/tiny-shapes/finetune.yaml"))
    assert load_model_from_config(config, f"{MODEL}/model.safetensors").vector_ema is None
    config = OmegaConf.load(f"{MODEL}/config.yaml")
    model = load_model_from_config(config, f"{MODEL}/model.safetensors")
    assert model.vector_ema is None
    with model.averaged_vectors():  # a no-op without a manager
        pass
    config.model.params.embedding_ema = 0.9
    with pytest.raises(ValueError, match="averages textual-inversion vectors"):
        load_model_from_config(config, f"{MODEL}/model.safetensors")


def train(ckpt, images, logdir, name, *extra):
    """A TI run of the tiny reference model -> the finished process."""
    cmd = [sys.executable, "train_new.py", "--base", "configs/tiny/txt2img-tiny-finetune.yaml", "-t",
           "--actual_resume", ckpt, "--data_root", images, "--init_word", "dog", "--placeholder_string", "*",
           "-l", str(logdir), "-n", name, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_a_run_saves_the_average_and_keeps_both_in_last_ckpt(ckpt, tiny_concept, tmp_path):
    out = train(ckpt, tiny_concept, tmp_path, "ema", "model.params.embedding_ema=0.99", "lightning.trainer.max_steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    folder = glob.glob(str(tmp_path / "*_ema"))[0]
    saved = torch.load(os.path.join(folder, "checkpoints", "embeddings.pt"), weights_only=True)["string_to_param"]
    state = torch.load(os.path.join(folder, "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    trained = next(v for k, v in state.items() if k.startswith("embedding_manager.") and k.endswith("*"))
    assert int(state["vector_ema.num_updates"]) == 6
    assert torch.equal(saved["*"], state["vector_ema.shadow_0"])
    assert not torch.equal(saved["*"], trained)


def test_a_bad_decay_in_a_run_is_one_error_line(ckpt, tiny_concept, tmp_path):
    out = train(ckpt, tiny_concept, tmp_path, "bad", "model.params.embedding_ema=1.5")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "embedding_ema=1.5" in lines[-1], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
