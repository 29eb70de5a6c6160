"""check/ablations.py runs variants from configs/ablations/ end to end (tiny settings) and writes its table."""
import csv
import os

from check import ablations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_variant_file_parses():
    names = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, ablations.VARIANTS)) if f.endswith(".yaml"))
    assert {"baseline", "v1_both", "v1_adapter_only", "output_injection", "vectors1", "regulariser",
            "imagenet_templates", "original_schedule"} <= set(names)
    for name in names:
        overlays, overrides = ablations.load_variant(name)
        assert all(os.path.isfile(os.path.join(REPO, p)) for p in overlays)
        assert all("=" in o for o in overrides)


def test_ablations_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    ablations.main(["--variants", "baseline", "v1_adapter_only", "--concepts", "checker_circle", "--n", "2",
                    "--steps", "2", "--logdir", str(tmp_path / "logs"), "--out", str(out),
                    "lightning.trainer.max_steps=11", "lightning.trainer.log_every_n_steps=1"])
    with open(out / "ablations.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["baseline", "v1_adapter_only"]
    baseline, adapter = rows
    assert int(baseline["trainable params"]) == 2 * 8 * 64  # eight 64-d vectors in each of the two timestep bands
    assert int(adapter["trainable params"]) > 1000  # adapter + block, vector frozen
    assert all(float(r["ms/step"]) > 0 and 0 <= float(r["fidelity"]) <= 1 for r in rows)
    assert (out / "ablations.png").stat().st_size > 0
    assert "Means over the concepts" in (out / "ablations.md").read_text()
    # a second command with the same --out reuses both pairs: nothing is trained again
    monkeypatch.setattr(ablations, "train_concept", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    ablations.main(["--variants", "baseline", "v1_adapter_only", "--concepts", "checker_circle", "--n", "2",
                    "--steps", "2", "--logdir", str(tmp_path / "logs"), "--out", str(out)])
    with open(out / "ablations.csv") as f:
        assert list(csv.DictReader(f)) == rows
    assert "| baseline | 1 |" in (out / "ablations.md").read_text()
