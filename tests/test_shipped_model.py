"""The shipped tiny shapes-world model: strict load with its config, small, usable for TI out of the box."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from load import load_model_from_config, read_state_dict

MODEL = "models/ldm/tiny-shapes"


def test_checkpoint_loads_strictly_with_its_config():
    model = load_model_from_config(OmegaConf.load(f"{MODEL}/config.yaml"), f"{MODEL}/model.safetensors", strict=True)
    state, _ = read_state_dict(f"{MODEL}/model.safetensors")
    assert set(state) == set(model.state_dict())
    assert os.path.getsize(f"{MODEL}/model.safetensors") <= 30 * 2 ** 20


def test_every_shipped_concept_builds_a_ti_model():
    config = OmegaConf.merge(OmegaConf.load(f"{MODEL}/config.yaml"),
                             OmegaConf.load("configs/tiny-shapes/finetune.yaml"))
    model = load_model_from_config(config, f"{MODEL}/model.safetensors")
    emb = model.cond_stage_model.token_embedding.weight
    concepts = sorted(d for d in os.listdir("dataset") if os.path.exists(f"dataset/{d}/concept.json"))
    assert len(concepts) >= 4
    for name in concepts:
        spec = json.load(open(f"dataset/{name}/concept.json"))
        (token,) = model.cond_stage_model.word_token_ids(spec["init_word"])
        assert spec["attributes"]["shape"] == spec["init_word"]
        assert 4 <= len([f for f in os.listdir(f"dataset/{name}") if f.endswith(".png")]) <= 6
        assert torch.isfinite(emb[token]).all()


def test_concept_table_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """check/concept_table.py trains a missing embedding, samples, reads and tabulates (tiny settings)."""
    from check import concept_table

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    concept_table.main(["--concepts", "checker_circle", "--embeddings", str(tmp_path / "emb"), "--n", "2",
                        "--ddim_steps", "2", "--sampler", "dpmpp_2m", "--out", str(tmp_path / "table.md"),
                        "--logdir", str(tmp_path / "logs"), "lightning.trainer.max_steps=2"])
    assert (tmp_path / "emb" / "checker_circle_seed23.pt").exists()
    table = (tmp_path / "table.md").read_text()
    assert "dpmpp_2m 2 steps" in table
    rows = [line for line in table.splitlines() if line.startswith("| checker_circle |")]
    assert [r.split(" | ")[1] for r in rows] == ["*", "circle"]
    assert "Targets: fidelity >= 0.6 and >= 3x the baseline on" in table


def test_concept_table_trains_each_seed_in_parallel_and_averages(tmp_path, monkeypatch):
    """--seeds trains one embedding per seed (two worker processes), and the `*` row is their mean."""
    from check import concept_table

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    emb = tmp_path / "emb"
    concept_table.main(["--concepts", "solid_square", "--embeddings", str(emb), "--n", "2", "--ddim_steps", "2",
                        "--seeds", "1", "2", "--jobs", "2", "--out", str(tmp_path / "table.md"),
                        "--logdir", str(tmp_path / "logs"), "lightning.trainer.max_steps=3"])
    first, second = (torch.load(emb / f"solid_square_seed{s}.pt", weights_only=True)["string_to_param"]["*"]
                     for s in (1, 2))
    assert not torch.equal(first, second)  # the seed reached the training
    runs = os.listdir(tmp_path / "logs")  # the two workers start in either order
    assert sorted(run.rsplit("_", 1)[-1] for run in runs) == ["seed1", "seed2"]
    header, star, baseline = [line for line in (tmp_path / "table.md").read_text().splitlines()
                                 if line.startswith("| ")][:3]
    columns = [c.strip() for c in header.strip("|").split("|")]
    star, baseline = ([c.strip() for c in row.strip("|").split("|")] for row in (star, baseline))
    by_seed = [float(v) for v in star[columns.index("fidelity by seed")].split(" / ")]
    assert len(by_seed) == 2 and abs(float(star[columns.index("fidelity")]) - sum(by_seed) / 2) < 1e-3
    assert baseline[columns.index("fidelity by seed")] == "-"
    seed_table = (tmp_path / "table.md").read_text().split("Each TI seed")[1]
    seed_lines = [line for line in seed_table.splitlines() if line.startswith("| solid_square")]
    seed_fid = [float(line.split("|")[3]) for line in seed_lines]
    assert [line.split("|")[2].strip() for line in seed_lines] == ["1", "2"] and seed_fid == by_seed


def test_concept_table_scores_a_variant_with_its_own_modules(tmp_path, monkeypatch, capsys):
    """--variant v1_both trains the adapter and block beside the vectors, keeps them beside the embedding and
    loads them for that embedding only; an embedding without them is refused, not scored without them."""
    from check import concept_table
    from ldm.checkpoints import read_state_dict

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    emb = tmp_path / "emb"
    argv = ["--variant", "v1_both", "--concepts", "checker_circle", "--embeddings", str(emb), "--n", "2",
            "--ddim_steps", "2", "--out", str(tmp_path / "table.md"), "--logdir", str(tmp_path / "logs")]
    concept_table.main([*argv, "lightning.trainer.max_steps=2"])
    assert "TI variant v1_both" in (tmp_path / "table.md").read_text()
    modules = emb / "checker_circle_seed23.modules.safetensors"
    trained, _ = read_state_dict(str(modules))
    assert any(k.startswith("cond_stage_model.adapter.") for k in trained)

    model = concept_table.load_ti_model("ldm", None, [], ["configs/improvement/v1.yaml"])
    own = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(own[k], v) for k, v in trained.items())  # two steps moved the modules
    with concept_table.modules_loaded(model, str(modules)):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())  # put back after

    modules.unlink()
    with pytest.raises(SystemExit) as info:
        concept_table.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and "modules.safetensors is missing" in errors[0]


def test_concept_table_workers_end_when_the_command_is_killed(tmp_path):
    """A killed concept_table command leaves no worker process training on."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "parent.py"
    script.write_text("import os, sys, time\n"
                      f"sys.path.insert(0, {repo!r})\n"
                      "from check.concept_table import worker_pool\n"
                      "if __name__ == '__main__':\n"
                      "    pool = worker_pool(1)\n"
                      "    print(pool.submit(os.getpid).result(), flush=True)\n"
                      "    pool.submit(time.sleep, 600)\n"
                      "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive while the command runs
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _alive(worker):
        time.sleep(0.2)
    assert not _alive(worker)


def _alive(pid):
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is (now) our child
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_target_summary_counts_concepts_meeting_the_targets():
    from check.concept_table import target_summary

    def scores(f, e):
        return {"fidelity": f, "editability": e}
    pairs = [(scores(0.7, 0.6), scores(0.2, 0)), (scores(0.7, 0.4), scores(0.3, 0)), (scores(0.5, 0.9), scores(0, 0))]
    line = target_summary(pairs, "ldm")
    assert "baseline on 1 of 3 concepts, editability >= 0.5 on 2 of 3" in line
    assert "mean fidelity 0.633, mean editability 0.633" in line
    assert "on 3 of 3 concepts;" in target_summary(pairs, "ar")


def test_autoregressive_checkpoint_loads_strictly_and_samples():
    ar = "models/ar/tiny-shapes"
    model = load_model_from_config(OmegaConf.load(f"{ar}/config.yaml"), f"{ar}/model.safetensors", strict=True)
    state, _ = read_state_dict(f"{ar}/model.safetensors")
    assert set(state) == set(model.state_dict())
    assert os.path.getsize(f"{ar}/model.safetensors") <= 30 * 2 ** 20
    assert len(model.cond_stage_model.word_token_ids("triangle")) > 1  # pieces, so the init word is averaged
    with torch.no_grad():
        x = model.eval().sample_images(["a photo of a red circle"] * 2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1


def test_word_loss_sees_the_outline_word_on_a_concept_without_outline(capsys):
    """check/word_loss.py: on solid_circle (no outline) "in the library" (outline none) beats
    "in the studio" (black)."""
    from check import word_loss

    word_loss.main(["--concept", "solid_circle", "--words", "library", "studio", "--t", "300", "500", "--noise", "2"])
    rows = {line.split(" | ")[0].strip("| "): [float(v) for v in line.strip(" |").split(" | ")[1:]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "t=" not in line}
    assert set(rows) == {"(no scene)", "in the library", "in the studio"}
    assert all(lib < studio for lib, studio in zip(rows["in the library"], rows["in the studio"]))


def test_sampler_accuracy_table(monkeypatch, capsys):
    """check/sampler_accuracy.py: each sampler's distance to the 1,000-step solution, from the same noise."""
    from check import sampler_accuracy

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sampler_accuracy.main(["--steps", "2", "20", "--n", "1", "--samplers", "ddim", "dpmpp_2m",
                           "--reference_steps", "200"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("ddim", "dpmpp"))}
    assert rows["ddim"][0] == "uniform" and rows["dpmpp_2m"][0] == "logsnr"
    errors = {k: [float(v[i]) for i in (1, 4)] for k, v in rows.items()}  # median at 2 and at 20 steps
    assert all(0 < at20 < at2 for at2, at20 in errors.values()), out


def test_seed_rows_of_concepts_with_different_edits_make_one_table():
    """Each concept has its own edit prompts: the per-seed table holds them in one column, whatever they are."""
    from check.concept_table import seed_row
    from ldm.data.shapes.scores import format_table

    def scores(edit):
        return {"fidelity": 0.5, "editability": 0.25, "per_attribute": {"shape": 1.0}, "edits": {edit: 0.25}}
    rows = [seed_row({"name": "a"}, 1, scores("a photo of a red *")), seed_row({"name": "b"}, 2, scores("a blue *"))]
    table = format_table(rows)
    assert "| a | 1 | 0.500 | 0.250 | 1.000 | a photo of a red *: 0.250 |" in table
    assert "| b | 2 | 0.500 | 0.250 | 1.000 | a blue *: 0.250 |" in table


def test_edit_when_writes_each_edit_word_as_a_prompt_edit(capsys):
    from check import concept_table
    from ldm.models.diffusion.prompt_edits import schedule

    spec = concept_table.load_specs(["checker_circle"])[0]
    edited = concept_table.scheduled_edits(spec, 0.4)
    assert concept_table.scheduled_edits(spec, None) is spec
    for before, after in zip(spec["edits"], edited["edits"]):
        assert after["prompt"] == f"a photo of a [{before['value']} :0.4]*"
        edges, texts = schedule([after["prompt"]], 1000, 50)
        assert edges == [600] and texts == [[before["prompt"]], ["a photo of a *"]]
    with pytest.raises(SystemExit) as info:
        concept_table.main(["--concepts", "checker_circle", "--edit_when", "1.5"])
    assert info.value.code == 2 and "--edit_when 1.5: give a fraction in (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        concept_table.main(["--concepts", "checker_circle", "--edit_when", "0.4", "--model", "ar"])
    assert info.value.code == 2 and "prompt edits need a diffusion model's timesteps" in capsys.readouterr().err
    odd = {**spec, "edits": [{**spec["edits"][0], "prompt": "a photo of *"}]}
    with pytest.raises(ValueError, match="does not hold its value"):
        concept_table.scheduled_edits(odd, 0.4)
