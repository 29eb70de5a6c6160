"""The benchmarks run end to end on the shipped tiny model and report a ratio and real memory figures."""
import glob
import json
import os
import re

from bench import sample, ti_step
from bench.common import peak_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peak_memory_sees_an_allocation_after_a_larger_one():
    import numpy as np

    np.ones(40_000_000).sum()  # a 305 MiB high-water mark that must not count below
    assert 60 <= peak_memory("cpu", lambda: np.ones(10_000_000).sum()) <= 120  # 76 MiB


def test_ti_step_and_sample_benches(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    ti_step.main(["--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    peaks = [float(m) for m in re.findall(r"^(?:original|ours)\s+[\d.]+\s+([\d.]+)$", out, re.M)]
    assert len(peaks) == 2 and all(p > 1.0 for p in peaks), out  # steps allocate: the child measures them
    assert re.search(r"speed-up [\d.]+x, memory ratio [\d.]+", out) and "where our step's time goes: data" in out
    assert re.search(r"outside PyTorch's operators .*: \d+-\d+% of our step", out)
    sample.main(["--n", "2", "--steps", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^ours .* 0\.00e\+00$", out, re.M) and "separate" in out


def test_ti_dataset_follows_the_config_or_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    shipped = ti_step.ti_dataset(ti_step.load_config(ti_step.DEFAULT_CONFIG), ti_step.DEFAULT_DATA, 16)
    plain = ti_step.ti_dataset(ti_step.load_config(["configs/bench/mid.yaml"]), ti_step.DEFAULT_DATA, 16)
    assert shipped.class_texts and not plain.class_texts  # the shipped TI config captions with colour words
    assert shipped[0]["image"].shape == plain[0]["image"].shape == (16, 16, 3)


def test_time_to_quality_trains_scores_every_checkpoint_and_rescores_saved_runs(tmp_path, monkeypatch, capsys):
    """Every recipe trains, each checkpoint is scored with the concept scores, and a finished run is scored again
    from its saved files without training (tiny settings: the figures are not quality)."""
    from omegaconf import OmegaConf

    from bench import time_to_quality as ttq
    from ldm.modules.embedding_formats import read_embeddings

    monkeypatch.chdir(REPO)
    argv = ["--concepts", "checker_square_lilac", "--steps", "4", "--every", "2", "--n", "2", "--ddim_steps", "2",
            "--logdir", str(tmp_path)]
    ttq.main(argv)
    out = capsys.readouterr().out
    for recipe in ttq.RECIPES:
        assert re.search(rf"^{recipe}, checker_square_lilac, seed 23 \(", out, re.M), out
        run = ttq.find_run(str(tmp_path / recipe), "checker_square_lilac_seed23")
        times = json.load(open(os.path.join(run, ttq.TIMES)))
        assert list(times) == ["2", "4"] and 0 < times["2"] <= times["4"]
        rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out.split(f"{recipe}, ")[1], re.M)
        assert [r[0] for r in rows[:2]] == ["2", "4"]
        assert all(0.0 <= float(v) <= 1.0 for r in rows[:2] for v in r[2:])
        config = OmegaConf.load(glob.glob(os.path.join(run, "configs", "*-project.yaml"))[0])
        embedding = read_embeddings(os.path.join(run, "checkpoints", "embeddings_gs-2.pt"))
        vectors = next(iter(embedding.matrices().values()))
        if recipe == "original":  # one vector, one band, batch 4, base lr 5e-3, no colour words
            assert vectors.shape[0] == 1 and config.data.params.batch_size == 4
            assert config.model.base_learning_rate == 5e-3 and config.data.params.train.params.class_text_p == 0.0
        else:
            assert vectors.shape[0] > 1
        # v1's checkpoints keep the adapter and block they were scored with beside the vectors
        assert os.path.isfile(os.path.join(run, "checkpoints", "modules_gs-2.safetensors")) == (recipe == "v1")
    assert re.search(r"^\| original \| checker_square_lilac \| 23 \| (not by 4|\d+) \|", out, re.M), out
    before = sorted(glob.glob(str(tmp_path / "*" / "*")))
    ttq.main(argv + ["--recipes", "ours"])
    assert sorted(glob.glob(str(tmp_path / "*" / "*"))) == before  # scored from the saved run, no new training
    assert re.search(r"^\| ours \| checker_square_lilac \| 23 \|", capsys.readouterr().out, re.M)


def test_gpu_check_smoke_prints_parity_and_one_table(tmp_path):
    """`bash bench/gpu_check.sh --smoke` (CPU, tiny configs): every parity case within tolerance, and one table with
    a TI-step and a sampling row per config, every cell filled (figures not checked: tiny and noisy)."""
    import subprocess

    from bench.gpu_check import COLUMNS, smoke_cases

    run = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path)}, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert (tmp_path / "gpu_check.txt").read_text() == out
    parity = re.findall(r"^(ldm|sd2|sdxl) \((?:eps|v)\)\s+.+\s+(ok|OFF)$", out, re.M)
    assert len(parity) == 17 and all(result == "ok" for _, result in parity), out
    assert {model for model, _ in parity} == {"ldm", "sd2", "sdxl"}
    table = [line for line in out.splitlines() if line.startswith("| ")]
    header, rows = table[0], table[1:]
    assert header == "| " + " | ".join(COLUMNS) + " |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    expected = [(case.name, bench) for case in smoke_cases() for bench in ("TI step", f"DDIM {case.sample_steps}")]
    assert [tuple(r[:2]) for r in rows[-len(expected):]] == expected, out
    for r in rows[-len(expected):]:
        assert len(r) == len(COLUMNS) and all(re.fullmatch(r"[\d.]+", c) for c in r[2:5] + r[5:7]), r
