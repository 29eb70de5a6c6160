"""Fault injection: a seeded run killed at any step (or mid-checkpoint, or on a full disk) and resumed with -r ends
bit-identical to the run that was never interrupted, with its metrics.csv whole; runs started together never
share a folder."""
import csv
import glob
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
# faults and the step after which each strikes: before the first checkpoint (7), between checkpoints, while the
# checkpoint of step 14 is written (it never takes its name), and the two stop signals (the run ends after the next
# step, saved); each resumed run meets the next fault
FAULTS = [("SIGKILL", 3, False), ("SIGKILL", 10, False), ("SIGKILL", 13, True), ("SIGTERM", 17, False),
          ("SIGINT", 21, False)]
EXIT = {"SIGKILL": -9, "SIGTERM": 143, "SIGINT": 130}


@pytest.fixture(scope="module")
def images(tiny_concept):
    """Two 16x16 images of a red square (tests/conftest.py)."""
    return tiny_concept


def train(ckpt, images, logdir, name, *extra):
    cmd = [sys.executable, "train_new.py", "--base", "configs/tiny/txt2img-tiny-finetune.yaml", "-t", "--actual_resume",
           ckpt, "--data_root", images, "--init_word", "dog", "--placeholder_string", "*", "-l", str(logdir),
           "-n", name,
           f"lightning.trainer.max_steps={STEPS}", "lightning.trainer.log_every_n_steps=1",
           "lightning.modelcheckpoint.params.every_n_train_steps=7",
           "lightning.callbacks.image_logger.params.batch_frequency=8",
           "model.params.embedding_ema=0.99",  # the vectors' moving average is state a resume must carry too
           *extra]
    return run(cmd)


def run(cmd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def resume(folder, *extra):
    return run([sys.executable, "train_new.py", "-r", folder, "-t", "--trust_configs", *extra])


def outcome(folder):
    """-> (vectors, optimizer state, global step, metrics rows) at the end of the run in `folder`."""
    vectors = torch.load(os.path.join(folder, "checkpoints", "embeddings.pt"), weights_only=True)["string_to_param"]
    last = torch.load(os.path.join(folder, "checkpoints", "last.ckpt"), weights_only=True)
    with open(os.path.join(folder, "metrics.csv"), newline="") as f:
        rows = [(r["step"], r["train/loss"], r["lr-AdamW"]) for r in csv.DictReader(f)]
    return vectors["*"], last["optimizer_states"][0]["state"], last["global_step"], rows


def max_diff(a, b):
    """Largest |a - b| over the vectors and the optimizer's moments."""
    diffs = [(a[0] - b[0]).abs().max()]
    for i, state in a[1].items():
        diffs += [(state[k].float() - b[1][i][k].float()).abs().max() for k in state]
    return max(float(d) for d in diffs)


@pytest.fixture(scope="module")
def reference(ckpt, images, tmp_path_factory):
    """The uninterrupted run's folder."""
    logdir = tmp_path_factory.mktemp("reference")
    out = train(ckpt, images, logdir, "reference")
    assert out.returncode == 0, out.stderr[-3000:]
    return glob.glob(str(logdir / "*_reference"))[0]


def fault_overrides():
    for i, (signum, step, during_save) in enumerate(FAULTS):
        yield from (f"lightning.callbacks.fault{i}.target=tests.fault_callbacks.SignalAt",
                    f"lightning.callbacks.fault{i}.params.step={step}",
                    f"lightning.callbacks.fault{i}.params.signum={signum}",
                    f"lightning.callbacks.fault{i}.params.during_save={during_save}")


def test_killed_anywhere_resumes_bit_identical(ckpt, images, tmp_path, reference):
    out = train(ckpt, images, tmp_path, "faults", *fault_overrides())
    folder = glob.glob(str(tmp_path / "*_faults"))[0]
    last = os.path.join(folder, "checkpoints", "last.ckpt")
    for i, (signum, step, during_save) in enumerate(FAULTS):
        saved = torch.load(last, weights_only=True)["global_step"] if os.path.exists(last) else 0
        print(f"\n{signum} after step {step}{' while writing last.ckpt' if during_save else ''}: exit "
              f"{out.returncode}, resumable from step {saved}", end="")
        assert out.returncode == EXIT[signum], out.stderr[-3000:]
        out = resume(folder, f"lightning.callbacks.fault{i}.params.step=-1")  # on to the next fault
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = outcome(folder), outcome(reference)
    assert want[2] == STEPS and [int(r[0]) for r in want[3] if r[1]] == list(range(STEPS))  # a loss row each step
    for name in ("embeddings_gs-7.pt", "embeddings_gs-14.pt", "embeddings_gs-21.pt", "embeddings_gs-24.pt"):
        written = [torch.load(os.path.join(f, "checkpoints", name), weights_only=True)["string_to_param"]["*"]
                   for f in (folder, reference)]
        assert torch.equal(*written), name  # each written by another of the resumed runs
    diff = max_diff(got, want)
    print(f"\nfinal: step {got[2]}, max |delta| vs the uninterrupted run {diff:.1e} (vectors, Adam moments), "
          f"metrics rows {len(got[3])} of {len(want[3])}, equal: {got[3] == want[3]}")
    assert diff == 0 and got[2] == want[2]
    assert got[3] == want[3]  # every step once, with the same losses and learning rates
    assert not glob.glob(os.path.join(folder, "checkpoints", ".*"))  # no partial file left behind


def test_full_disk_is_one_line_and_the_run_resumes(ckpt, images, tmp_path, reference):
    full = train(ckpt, images, tmp_path, "full", "lightning.callbacks.fault.target=tests.fault_callbacks.DiskFullAt",
                 "lightning.callbacks.fault.params.step=10")
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert full.returncode == 2 and len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "no space left" in errors[0] and "free" in errors[0] and "checkpoints" in errors[0], errors
    folder = glob.glob(str(tmp_path / "*_full"))[0]
    assert torch.load(os.path.join(folder, "checkpoints", "last.ckpt"), weights_only=True)["global_step"] == 7
    assert resume(folder, "lightning.callbacks.fault.params.step=-1").returncode == 0
    assert max_diff(outcome(folder), outcome(reference)) == 0


def test_runs_started_together_get_their_own_folders(ckpt, images, tmp_path):
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: train(ckpt, images, tmp_path, "same", "lightning.trainer.max_steps=2"), [0, 1]))
    assert all(o.returncode == 0 for o in outs), outs[0].stderr[-2000:]
    folders = sorted(glob.glob(str(tmp_path / "*_same")))
    assert len(folders) == 2, folders
    for folder in folders:
        assert len(glob.glob(os.path.join(folder, "configs", "*-project.yaml"))) == 1
        assert torch.load(os.path.join(folder, "checkpoints", "last.ckpt"), weights_only=True)["global_step"] == 2


def test_resume_refuses_configs_naming_outside_code(ckpt, images, tmp_path):
    out = train(ckpt, images, tmp_path, "outside", "lightning.trainer.max_steps=1",
                "lightning.callbacks.fault.target=tests.fault_callbacks.SignalAt",
                "lightning.callbacks.fault.params.step=-1")
    assert out.returncode == 0, out.stderr[-2000:]
    folder = glob.glob(str(tmp_path / "*_outside"))[0]
    refused = run([sys.executable, "train_new.py", "-r", folder, "-t"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
    assert "tests.fault_callbacks.SignalAt" in errors[0] and "--trust_configs" in errors[0]


def test_v1_run_stopped_and_resumed_matches_the_uninterrupted_one(ckpt, images, tmp_path):
    """Improvement v1 (vectors + adapter and block): stopped after step 9, between image grids, and resumed, the
    run ends with the vectors and modules of the uninterrupted run: the modules and their optimizer state are
    part of what a resume restores."""
    def v1(name, *extra):
        return run([sys.executable, "train_new.py", "--base", "configs/tiny/txt2img-tiny-finetune.yaml",
                    "configs/improvement/v1.yaml", "-t", "--actual_resume", ckpt, "--data_root", images,
                    "--init_word", "dog", "--placeholder_string", "*", "-l", str(tmp_path), "-n", name,
                    "lightning.trainer.max_steps=16", "lightning.modelcheckpoint.params.every_n_train_steps=5",
                    "lightning.callbacks.image_logger.params.batch_frequency=4", *extra])

    assert v1("whole").returncode == 0
    stop = ("lightning.callbacks.stop.target=tests.fault_callbacks.SignalAt",
            "lightning.callbacks.stop.params.step=9", "lightning.callbacks.stop.params.signum=SIGTERM")
    assert v1("stopped", *stop).returncode == EXIT["SIGTERM"]
    folder = glob.glob(str(tmp_path / "*_stopped"))[0]
    out = resume(folder, "lightning.callbacks.stop.params.step=-1")
    assert out.returncode == 0, out.stderr[-3000:]
    whole = glob.glob(str(tmp_path / "*_whole"))[0]
    vectors = [torch.load(os.path.join(f, "checkpoints", "embeddings.pt"), weights_only=True)["string_to_param"]["*"]
               for f in (folder, whole)]
    assert torch.equal(*vectors)
    modules = [pathlib.Path(f, "checkpoints", "modules.safetensors").read_bytes() for f in (folder, whole)]
    assert modules[0] == modules[1]
