"""txt2img.py with bad input (one `error:` line, exit 2, no traceback), and samples never written over: after a
deletion, by two runs into one --outdir, or under names some OS refuses."""
import concurrent.futures
import errno
import hashlib
import multiprocessing
import os
import subprocess
import sys

import pytest
from test_checkpoint_loading import (
    make_empty,
    make_folder,
    make_os_system,
    make_png,
    make_safetensors_bad_header,
    make_truncated_zip,
)

import txt2img
from ldm import inference
from ldm.util import next_number, write_numbered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny/txt2img-tiny-finetune.yaml"
TINY = ["--ddim_steps", "2", "--n_samples", "2", "--H", "16", "--W", "16"]  # the tiny model: 16 px, factor 4


def command(ckpt, outdir, *extra):
    """txt2img.py on the tiny model; `extra` flags override the tiny defaults (argparse keeps the last)."""
    return [sys.executable, "txt2img.py", "--config", CONFIG, "--ckpt_path", ckpt, "--outdir", str(outdir),
            "--prompt", "a photo of *", *TINY, *extra]


def run(cmd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def read_only_folder(tmp_path):
    """A folder nobody here may create files in: mode 555, or for root (whom modes do not stop) a sysfs path."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not os.path.isdir("/sys"):
        pytest.skip("no read-only folder for root here")
    return "/sys/txt2img-outdir"


# (id, the change to a good command: extra flags, a setup's name or a --ckpt_path maker; what the error line says)
BAD = [  # each a txt2img.py process
    ("scale nan", ["--scale", "nan"], "--scale nan is not a finite number"),
    ("ddim_eta inf", ["--ddim_eta", "inf"], "--ddim_eta inf is not a finite number"),
    ("n_samples 0", ["--n_samples", "0"], "--n_samples 0 must be greater than 0: give 1 or more"),
    ("n_iter 0", ["--n_iter", "0"], "--n_iter 0 must be greater than 0"),
    ("ddim_steps 0", ["--ddim_steps", "0"], "--ddim_steps 0 must be greater than 0"),
    ("H 31", ["--H", "31"], "--H 31 is not a multiple of 4, this model's downsampling factor: use 28 or 32"),
    ("top_k -1", ["--top_k", "-1"], "--top_k -1 is negative"),
    ("top_p 1.5", ["--top_p", "1.5"], "--top_p 1.5 is outside (0, 1]"),
    ("temperature 0", ["--temperature", "0"], "--temperature 0.0 must be greater than 0"),
    ("read-only outdir", "read-only", "permission denied"),
    ("empty ckpt", make_empty, "is empty (0 bytes)"),
    ("ckpt pickling code", make_os_system, "pickles code (os.system); loading never runs pickled code"),
]
MORE = [  # the same in this process (no Python to start: quick)
    ("top_p nan", ["--top_p", "nan"], "--top_p nan is not a finite number"),
    ("temperature -inf", ["--temperature=-inf"], "--temperature -inf is not a finite number"),
    ("H 0", ["--H", "0"], "--H 0 must be greater than 0"),
    ("W 18", ["--W", "18"], "--W 18 is not a multiple of 4, this model's downsampling factor: use 16 or 20"),
    ("W 2", ["--W", "2"], "--W 2 is not a multiple of 4, this model's downsampling factor: use 4"),
    ("top_p 0", ["--top_p", "0"], "--top_p 0.0 is outside (0, 1]"),
    ("device", ["--device", "tpu9"], "--device tpu9 is not a device"),
    ("empty prompt file", "empty-prompts", "holds no prompt"),
    ("config not YAML", "bad-config", "is not valid YAML"),
    ("config missing", ["--config", "nowhere.yaml"], "config not found: nowhere.yaml"),
    ("truncated ckpt", make_truncated_zip, "is truncated or damaged"),
    ("PNG as ckpt", make_png, "is not a checkpoint"),
    ("safetensors header", make_safetensors_bad_header, "is truncated or damaged"),
    ("folder as ckpt", make_folder, "is a folder, not a file"),
    ("prompt edit when", ["--prompt", "a photo of a [red :1.5]*"], "when = 1.5 is neither a fraction in (0, 1)"),
    ("prompt edit unclosed", ["--prompt", "a photo of a [red :0.4 *"], "is nested or not closed"),
]


def bad_command(case, ckpt, folder):
    """The txt2img command line of a BAD or MORE case, its files made in `folder`."""
    _, change, _ = case
    if isinstance(change, list):
        return command(ckpt, folder / "out", *change)
    if change == "empty-prompts":
        (folder / "prompts.txt").write_text("\n  \n")
        return command(ckpt, folder / "out", "--from-file", str(folder / "prompts.txt"))
    if change == "bad-config":
        (folder / "bad.yaml").write_text("model: [1, 2\n")
        return command(ckpt, folder / "out", "--config", str(folder / "bad.yaml"))
    if change == "read-only":
        return command(ckpt, read_only_folder(folder))
    change(folder / "model.ckpt")
    return command(str(folder / "model.ckpt"), folder / "out")


@pytest.fixture(scope="module")
def bad_runs(ckpt, tmp_path_factory):
    """{case id: (folder, CompletedProcess)} of every BAD case, a few at a time (each starts a Python)."""
    folders = {case[0]: tmp_path_factory.mktemp("bad") for case in BAD}
    commands = {case[0]: bad_command(case, ckpt, folders[case[0]]) for case in BAD}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        done = dict(zip(commands, pool.map(run, commands.values())))
    return {name: (folders[name], done[name]) for name in commands}


def check_refusal(returncode, stderr, expect, folder):
    """Exit status 2, exactly one `error:` line saying `expect`, no traceback, nothing run or written."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert returncode == 2, stderr[-2000:]
    assert len(errors) == 1 and expect in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (folder / "MARKER").exists()
    assert not list((folder / "out").glob("**/*.png")), "an image was written despite the error"


@pytest.mark.parametrize("case", BAD, ids=[case[0] for case in BAD])
def test_bad_input_gets_one_line_and_exit_2(case, bad_runs):
    folder, out = bad_runs[case[0]]
    check_refusal(out.returncode, out.stderr, case[2], folder)


@pytest.mark.parametrize("case", MORE, ids=[case[0] for case in MORE])
def test_more_bad_input_in_process(case, ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        txt2img.main(bad_command(case, ckpt, tmp_path)[2:])
    check_refusal(info.value.code, capsys.readouterr().err, case[2], tmp_path)


def digests(folder):
    """{file name: sha256} of every file under `folder`."""
    return {os.path.relpath(p, folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_a_run_after_a_deleted_sample_writes_over_nothing(ckpt, tmp_path):
    """Numbering by counting the files reused a number after a deletion; numbers now go on from the largest."""
    sample = ["--config", CONFIG, "--ckpt_path", ckpt, "--outdir", str(tmp_path), "--prompt", "a photo of *", *TINY]
    first = txt2img.main([*sample, "--seed", "1"])
    os.remove(first[0])
    before = digests(tmp_path)
    second = txt2img.main([*sample, "--seed", "2"])
    after = digests(tmp_path)
    assert {k: after[k] for k in before} == before, "a file of the first run changed"
    assert len(after) == len(before) + 3  # two samples and a grid, all new
    assert [os.path.basename(p) for p in second] == ["00002.png", "00003.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a-photo-of-star-00000.png", "a-photo-of-star-00001.png"]


def test_two_runs_into_one_outdir_keep_every_image(ckpt, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(command(ckpt, tmp_path, "--seed", str(seed)), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for proc in procs:
        stderr = proc.communicate(timeout=300)[1]
        assert proc.returncode == 0, stderr[-2000:]
    samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert samples == [f"{k:05}.png" for k in range(4)]  # 2 runs x 2 samples, none lost
    assert len(list(tmp_path.glob("a-photo-of-star-*.png"))) == 2
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


@pytest.mark.parametrize("prompt, name", [
    ('a <cat-toy>: "*" | x?\\y/z', "a-cat-toy-star-x-y-z"),
    ("***", "starstarstar"),
    ("<>:|?", "prompt"),
    ("a" + "고양이" * 50, ("a" + "고양이" * 50)[:40]),  # 120 bytes of UTF-8 at most, no character cut in half
])
def test_slug_is_a_file_name_every_os_accepts(prompt, name):
    slug = inference.slug(prompt)
    assert slug == name
    assert not set(slug) & set('<>:"/\\|?*') and len(slug.encode()) <= 120


def write_text(text):
    """A write(path) for write_numbered that writes `text`."""
    def write(path):
        with open(path, "w") as f:
            f.write(text)
    return write


def test_numbers_go_on_from_the_largest(tmp_path):
    for name in ("00003.png", "00007.png", "notes.png", "grid-00009.png", "00005.txt"):
        (tmp_path / name).write_text("mine")
    assert next_number(str(tmp_path), suffix=".png") == 8
    path = write_numbered(str(tmp_path), write_text("new"), suffix=".png")
    assert os.path.basename(path) == "00008.png" and open(path).read() == "new"
    assert write_numbered(str(tmp_path), write_text("g"), prefix="grid-", suffix=".png").endswith("grid-00010.png")
    assert all((tmp_path / n).read_text() == "mine" for n in ("00003.png", "00007.png", "notes.png"))


def test_a_name_taken_meanwhile_is_skipped_not_written_over(tmp_path, monkeypatch):
    """Another process claims 00000.png between the scan and the claim: this one takes 00001.png."""
    real_link = os.link

    def link_after_a_rival(src, dst):
        if not os.path.exists(tmp_path / "00000.png"):
            (tmp_path / "00000.png").write_text("rival")
        return real_link(src, dst)
    monkeypatch.setattr(os, "link", link_after_a_rival)
    path = write_numbered(str(tmp_path), write_text("mine"), suffix=".png")
    assert os.path.basename(path) == "00001.png" and (tmp_path / "00000.png").read_text() == "rival"


def test_without_hard_links_names_are_claimed_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported", dst)
    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "00000.png").write_text("mine")
    paths = [write_numbered(str(tmp_path), write_text(str(k)), suffix=".png") for k in range(3)]
    assert [os.path.basename(p) for p in paths] == ["00001.png", "00002.png", "00003.png"]
    assert [open(p).read() for p in paths] == ["0", "1", "2"] and (tmp_path / "00000.png").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == [f"{k:05}.png" for k in range(4)]  # no temporary file left


def _write_many(folder, worker, n):
    return [write_numbered(folder, write_text(f"{worker}-{k}"), suffix=".png") for k in range(n)]


def test_processes_writing_at_once_keep_every_file(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        paths = [p for batch in pool.starmap(_write_many, [(str(tmp_path), w, 25) for w in range(4)]) for p in batch]
    assert len(set(paths)) == 100 and sorted(os.listdir(tmp_path)) == [f"{k:05}.png" for k in range(100)]
    assert sorted(open(p).read() for p in paths) == sorted(f"{w}-{k}" for w in range(4) for k in range(25))
