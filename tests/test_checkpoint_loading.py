"""Bad checkpoints through ldm.checkpoints.read_state_dict and train_new.py --actual_resume: one line naming the
file, exit 2, and never a pickled call run."""
import argparse
import builtins
import os
import pickle
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm import checkpoints
from ldm.checkpoints import CheckpointError, read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny/txt2img-tiny-finetune.yaml"
WEIGHTS = {"model.w": torch.arange(6.0)}


class Reduce:
    """Pickles as a call of func(*args): what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def marker_command(folder):
    return f"touch {folder / 'MARKER'}"


def lightning_file(path, extra, legacy=False):
    """A Lightning-style checkpoint holding WEIGHTS and `extra` at the top level."""
    torch.save({"state_dict": WEIGHTS, "global_step": 3, **extra}, path, _use_new_zipfile_serialization=not legacy)


def cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def make_empty(path):
    path.write_bytes(b"")


def make_truncated_zip(path):
    lightning_file(path, {})
    cut(path)


def make_truncated_legacy(path):
    lightning_file(path, {}, legacy=True)
    cut(path)


def make_safetensors_bad_header(path):
    save_file(WEIGHTS, str(path))
    data = bytearray(path.read_bytes())
    data[9:20] = b"\xff" * 11  # inside the JSON header
    path.write_bytes(bytes(data))


def make_safetensors_truncated(path):
    save_file(WEIGHTS, str(path))
    cut(path, 0.9)


def make_png(path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")


def make_text(path):
    path.write_text("model:\n  target: x\n")


def make_folder(path):
    path.mkdir()


def make_os_system(path):
    lightning_file(path, {"callbacks": Reduce(os.system, marker_command(path.parent))})


def make_os_system_legacy(path):
    lightning_file(path, {"callbacks": Reduce(os.system, marker_command(path.parent))}, legacy=True)


def make_eval(path):
    lightning_file(path, {"x": Reduce(builtins.eval, f"__import__('os').system('{marker_command(path.parent)}')")})


def make_subprocess(path):
    lightning_file(path, {"x": Reduce(subprocess.Popen, ["touch", str(path.parent / "MARKER")])})


def make_instance(path):
    lightning_file(path, {"hyper_parameters": argparse.Namespace(lr=1.0)})


def make_no_state_dict(path):
    torch.save({"optimizer": {"lr": 1.0}}, path)


BAD = [  # (name, file name, builder, what the one line says)
    ("empty", "model.ckpt", make_empty, "is empty (0 bytes)"),
    ("truncated", "model.ckpt", make_truncated_zip, "is truncated or damaged"),
    ("truncated legacy format", "model.ckpt", make_truncated_legacy, "is truncated or damaged"),
    ("safetensors, corrupt header", "model.safetensors", make_safetensors_bad_header, "is truncated or damaged"),
    ("safetensors, truncated", "model.safetensors", make_safetensors_truncated, "is truncated or damaged"),
    ("a PNG", "model.ckpt", make_png, "is not a checkpoint"),
    ("a text file", "model.ckpt", make_text, "is not a checkpoint"),
    ("a folder", "model.ckpt", make_folder, "is a folder, not a file"),
    ("os.system", "model.ckpt", make_os_system, "pickles code (os.system); loading never runs pickled code"),
    ("os.system, legacy format", "model.ckpt", make_os_system_legacy, "pickles code (os.system)"),
    ("builtins.eval", "model.ckpt", make_eval, "pickles code (builtins.eval)"),
    ("subprocess.Popen", "model.ckpt", make_subprocess, "pickles code (subprocess.Popen)"),
    ("an object to build", "model.ckpt", make_instance, "pickles code (argparse.Namespace)"),
    ("no state dict", "model.ckpt", make_no_state_dict, "holds no state dict"),
]


@pytest.mark.parametrize("name, filename, make, expect", BAD, ids=[b[0] for b in BAD])
def test_read_state_dict_refuses_with_one_line(name, filename, make, expect, tmp_path):
    path = tmp_path / filename
    make(path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(str(path))
    message = str(info.value)
    assert expect in message and str(path) in message and "\n" not in message, message
    assert not (tmp_path / "MARKER").exists()


def test_missing_checkpoint_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(str(tmp_path / "nowhere.ckpt"))


@pytest.mark.parametrize("legacy", [False, True])
def test_good_checkpoints_still_load(tmp_path, legacy):
    path = tmp_path / "good.ckpt"
    lightning_file(path, {"epoch": 1}, legacy=legacy)
    state, info = read_state_dict(str(path))
    assert torch.equal(state["model.w"], WEIGHTS["model.w"]) and info == {"global_step": 3, "epoch": 1}


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    """(module name, class) of a module that exists on sys.path and writes MARKER when imported; the class is
    pickled under that module's name but the module itself is never imported here."""
    name = "ti_fake_callbacks"
    (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w').close()\nclass Callback: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stub = types.ModuleType(name)
    stub.Callback = type("Callback", (), {"__module__": name})
    monkeypatch.setitem(sys.modules, name, stub)  # pickle finds the class while saving, without the real module
    yield name, stub.Callback
    assert not (tmp_path / "MARKER").exists(), "the pickled class's module was imported"


def test_a_class_reference_loads_through_an_inert_stand_in(fake_module, tmp_path):
    """Lightning checkpoints key callback states by class: the class is referred to, never imported or called."""
    name, cls = fake_module
    path = tmp_path / "lightning.ckpt"
    lightning_file(path, {"callbacks": {cls: {"best_model_score": None}}})
    del sys.modules[name]
    state, info = read_state_dict(str(path))
    assert torch.equal(state["model.w"], WEIGHTS["model.w"]) and info == {"global_step": 3}
    assert name not in sys.modules


def legacy_file(path, obj_pickle):
    """A legacy-format torch.save file whose object is the raw pickle `obj_pickle` (protocol 2)."""
    head = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                            "type_sizes": {"short": 2, "int": 4, "long": 4}}]
    with open(path, "wb") as f:
        for part in head:
            pickle.dump(part, f, protocol=2)
        f.write(obj_pickle)
        pickle.dump([], f, protocol=2)


@pytest.mark.parametrize("opcodes, expect", [
    (b")R", "pickles code (ti_fake_callbacks.Callback)"),  # REDUCE: call the class
    (b")\x81", "pickles code (ti_fake_callbacks.Callback)"),  # NEWOBJ: cls.__new__(cls)
    (b"}b", "pickles objects other than tensors and plain containers"),  # BUILD: set state on the class
], ids=["reduce", "newobj", "build"])
def test_a_stand_in_cannot_be_called_or_built(fake_module, tmp_path, opcodes, expect):
    """Whatever a pickle does with a stand-in beyond referring to it is refused: nothing runs."""
    name, _ = fake_module
    del sys.modules[name]
    path = tmp_path / "crafted.ckpt"
    legacy_file(path, b"\x80\x02c" + name.encode() + b"\nCallback\n" + opcodes + b".")
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        read_state_dict(str(path))
    assert name not in sys.modules


def test_a_stand_in_class_refuses_every_instantiation():
    stand_in = checkpoints._stand_in("pkg.Thing")
    for make in (stand_in, lambda: stand_in.__new__(stand_in), lambda: stand_in("touch MARKER")):
        with pytest.raises(checkpoints.PickledCall, match="pkg.Thing"):
            make()


def test_every_torch_load_is_weights_only(tmp_path, monkeypatch):
    """The refusal comes from weights-only loading: torch.load never runs without it, not even on a retry."""
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    make_os_system(tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError):
        read_state_dict(str(tmp_path / "evil.ckpt"))
    assert calls and all(w is True for w in calls)
    assert not (tmp_path / "MARKER").exists()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 + 100 * i, np.uint8)).save(folder / f"{i}.png")
    return str(folder)


CLI = [b for b in BAD if b[0] in ("empty", "truncated", "safetensors, corrupt header", "os.system")]


@pytest.fixture(scope="module")
def train_new_runs(images, tmp_path_factory):
    """{case: (checkpoint path, returncode, stderr)} of train_new.py --actual_resume on each CLI case, run at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LDM_RUN_STAMP", None)
    started = {}
    for name, filename, make, _ in CLI:
        folder = tmp_path_factory.mktemp("resume")
        make(folder / filename)
        command = [sys.executable, "train_new.py", "--base", CONFIG, "-t", "--actual_resume", str(folder / filename),
                   "--data_root", images, "--init_word", "dog", "--placeholder_string", "*", "-l", str(folder / "logs")]
        started[name] = folder / filename, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                                            stderr=subprocess.PIPE, text=True)
    return {name: finished(path, proc) for name, (path, proc) in started.items()}


def finished(path, proc):
    """-> (path, returncode, stderr) once `proc` has ended."""
    stderr = proc.communicate(timeout=300)[1]
    return path, proc.returncode, stderr


@pytest.mark.parametrize("name, expect", [(b[0], b[3]) for b in CLI], ids=[b[0] for b in CLI])
def test_train_new_actual_resume_refuses_with_one_line(name, expect, train_new_runs):
    path, returncode, stderr = train_new_runs[name]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert returncode == 2, stderr[-2000:]
    assert len(errors) == 1 and expect in errors[0] and str(path) in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (path.parent / "MARKER").exists()
