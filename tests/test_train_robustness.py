"""train_new.py under DDP, interruption and bad input: one clear line, nothing lost."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny/txt2img-tiny-finetune.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpdata")
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 + 100 * i, np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def command(images, ckpt, logdir, *extra):
    return [sys.executable, "train_new.py", "--base", CONFIG, "-t", "--actual_resume", ckpt, "--data_root", images,
            "--init_word", "dog", "--placeholder_string", "*", "-l", str(logdir), *extra]


def run(cmd, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_ddp_two_cpu_processes_train_the_same_embedding(images, ckpt, tmp_path):
    out = run(command(images, ckpt, tmp_path, "lightning.trainer.devices=2", "lightning.trainer.max_steps=6",
                      "lightning.callbacks.image_logger.params.batch_frequency=1000"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "embedding identical on all 2 ranks" in out.stdout + out.stderr
    runs = glob.glob(str(tmp_path / "*"))
    assert len(runs) == 1, runs  # one run folder: both ranks agree on it, only rank 0 writes
    assert "2.00e-02 (1 x 2 x 2 x 5.00e-03)" in out.stdout + out.stderr  # lr scaled by the device count


def test_sigterm_saves_the_embedding_and_a_resumable_checkpoint(images, ckpt, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command(images, ckpt, tmp_path, "lightning.trainer.max_steps=100000",
                                    "lightning.callbacks.image_logger.params.batch_frequency=100000",
                                    "lightning.modelcheckpoint.params.every_n_train_steps=100000"),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not glob.glob(str(tmp_path / "*" / "metrics.csv")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]  # never 0: the run did not finish
    run_dir = glob.glob(str(tmp_path / "*"))[0]
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "embeddings.pt")), output[-2000:]
    last = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), weights_only=False)
    assert last["global_step"] > 0
    assert all(k.startswith("embedding_manager.") for k in last["state_dict"])


@pytest.mark.parametrize("case, expect", [
    ("missing_root", "is not a folder"),
    ("empty_root", "no images"),
    ("bad_init_word", "not in the text encoder's vocabulary"),
    ("vocabulary_word_placeholder", "already the vocabulary token"),
    ("missing_ckpt", "not found"),
    ("other_architecture", "missing"),
])
def test_bad_input_gets_one_line(case, expect, images, ckpt, tmp_path, manifest_dir):
    args = {"root": images, "init": "dog", "ph": "*", "ckpt": ckpt}
    if case == "missing_root":
        args["root"] = str(tmp_path / "nowhere")
    elif case == "empty_root":
        os.makedirs(tmp_path / "empty")
        args["root"] = str(tmp_path / "empty")
    elif case == "bad_init_word":
        args["init"] = "\u2603"  # a snowman: the unknown token, in no vocabulary
    elif case == "vocabulary_word_placeholder":
        args["ph"] = "dog"
    elif case == "missing_ckpt":
        args["ckpt"] = str(tmp_path / "model.ckpt")
    elif case == "other_architecture":
        torch.save({"state_dict": {"model.diffusion_model.foo.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
        args["ckpt"] = str(tmp_path / "other.ckpt")
    cmd = [sys.executable, "train_new.py", "--base", CONFIG, "-t", "--actual_resume", args["ckpt"], "--data_root",
           args["root"], "--init_word", args["init"], "--placeholder_string", args["ph"], "-l", str(tmp_path / "logs")]
    out = run(cmd)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_txt2img_embedding_of_another_width_names_both(ckpt, tmp_path):
    emb = tmp_path / "wide.pt"
    torch.save({"string_to_token": {"*": torch.tensor(1008)}, "string_to_param": {"*": torch.zeros(1, 768)}}, emb)
    out = run([sys.executable, "txt2img.py", "--config", CONFIG, "--ckpt_path", ckpt, "--embedding_path", str(emb),
               "--prompt", "a photo of *", "--outdir", str(tmp_path / "out"), "--ddim_steps", "2"])
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "768" in errors[0] and "32" in errors[0], out.stderr[-2000:]


def test_check_model_reports_frozen_and_trainable(ckpt):
    out = run([sys.executable, "check/model.py", "--config", CONFIG, "--ckpt", ckpt])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0 missing, 0 unexpected" in out.stdout + out.stderr
    assert "optimizer would hold 1 tensor(s), 32 values" in out.stdout
