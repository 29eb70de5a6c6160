"""What a user sees of a training run: progress over the whole run, a quiet console, labelled validation grids,
the loggers they pick, and the guards against a run that cannot learn."""
import glob
import os
import sqlite3
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tiny_concept):
    """Two 16x16 images of a red square (tests/conftest.py)."""
    return tiny_concept


def train(images, logdir, *extra, ckpt=None, env=()):
    resume = ["--actual_resume", ckpt] if ckpt else []
    cmd = [sys.executable, "train_new.py", "--base", "configs/tiny/txt2img-tiny-finetune.yaml", "-t", *resume,
           "--data_root", images, "--init_word", "dog", "--placeholder_string", "*", "-l", str(logdir), *extra]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **dict(env)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=300)


def one_error(out):
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return errors[0]


def test_log_file_console_validation_grids_and_loggers(images, ckpt, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = train(images, tmp_path, "-n", "seen", "lightning.trainer.max_steps=6",
                "lightning.trainer.log_every_n_steps=2",
                "--validation_prompts", "a photo of a *", "a purple *", "--validation_every", "3",
                "--logger", "tensorboard,wandb,mlflow", ckpt=ckpt, env={"WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "step 6/6" in console and "s/step" in console  # a plain line in a log file, over the whole run
    for noise in ("Epoch 0/", "Tip:", "litlogger", "eval mode", "LeafSpec", "Total length of `list`"):
        assert noise not in console, noise
    folder = glob.glob(str(tmp_path / "*_seen"))[0]
    grids = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "images", "validation_*.png")))
    assert grids == ["validation_gs-000003.png", "validation_gs-000006.png"]
    grid = Image.open(os.path.join(folder, "images", grids[0]))
    assert grid.width >= 2 * 128 and grid.height >= 2 * 128  # 16 px samples shown at a viewable size
    assert glob.glob(os.path.join(folder, "wandb", "offline-run-*"))
    with sqlite3.connect(os.path.join(folder, "mlflow.db")) as db:
        runs = db.execute("select name from runs").fetchall()
        steps = db.execute("select count(*) from metrics where key = 'train/loss'").fetchone()[0]
    assert runs == [(os.path.basename(folder),)] and steps > 0
    assert len(glob.glob(os.path.join(folder, "mlflow-artifacts", "**", "validation_*.png"), recursive=True)) == 2
    assert os.path.isfile(os.path.join(folder, "metrics.csv")) and os.path.isfile(os.path.join(folder, "loss.png"))


@pytest.mark.parametrize("case, expect", [
    ("no_weights", "--from_scratch"),
    ("trainer_logger", "use --logger"),
    ("unknown_logger", "unknown logger 'neptune'"),
])
def test_bad_runs_get_one_line(case, expect, images, ckpt, tmp_path):
    args = {"no_weights": ((), None), "trainer_logger": (("lightning.trainer.logger=false",), ckpt),
            "unknown_logger": (("--logger", "csv,neptune"), ckpt)}[case]
    assert expect in one_error(train(images, tmp_path, *args[0], ckpt=args[1]))


def test_vectors_that_never_move_stop_the_run(images, ckpt, tmp_path):
    out = train(images, tmp_path, "model.base_learning_rate=0.0", "lightning.trainer.max_steps=30", ckpt=ckpt)
    line = one_error(out)
    assert "have not moved in 20 steps" in line and "learning rate" in line
