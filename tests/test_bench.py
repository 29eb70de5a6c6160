"""The benchmarks run end to end on the shipped tiny model and report a ratio and real memory figures."""
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
