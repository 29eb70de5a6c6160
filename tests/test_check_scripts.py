"""check/init_word.py and check/placeholder.py, run in-process on tiny models; every check/ command's user errors."""
import importlib
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from check import init_word, placeholder
from ldm.cli import UsageError
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.modules import BERTEmbedder


@pytest.mark.parametrize("word, expected", [
    ("dog", "['dog'] ids [3899] (a single token"),
    ("teddybear", "['teddy', '##be', '##ar'] ids [11389, 4783, 2906] (3 tokens: usable as initializer word"),
    ("\U0001F642", "has [UNK]"),
])
def test_init_word_tokenization(capsys, word, expected):
    init_word.main([word, "--n_embed", "32", "--n_layer", "1"])
    assert expected in capsys.readouterr().out


def test_help_and_usage_errors(capsys):
    for script in (init_word, placeholder):
        with pytest.raises(SystemExit) as info:
            script.main(["--help"])
        assert info.value.code == 0 and "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):
        init_word.main(["dog", "--config", "x.yaml"])


def test_init_word_neighbours_from_checkpoint(capsys, tmp_path, fixture_dir):
    pytest.importorskip("load")
    hp = json.loads((fixture_dir / "hyperparameters.json").read_text())
    OmegaConf.save(OmegaConf.create({"model": hp["constructor_arguments"]}), tmp_path / "tiny.yaml")
    init_word.main(["dog", "--config", str(tmp_path / "tiny.yaml"),
                    "--ckpt", str(fixture_dir / "state_dict.safetensors"), "--top", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("nearest to dog: ") and lines[-1].count(", ") == 2


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    """1- and 3-vector embedding files of a seeded width-32 encoder."""
    folder = tmp_path_factory.mktemp("embeddings")
    torch.manual_seed(0)
    bert = BERTEmbedder(n_embed=32, n_layer=1)
    for n in (1, 3):
        EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=n).save(folder / f"e{n}.pt")
    return folder


@pytest.mark.parametrize("name, positions", [("e1.pt", "[4]"), ("e3.pt", "[4, 5, 6]")])
def test_placeholder_changes_only_its_positions(capsys, embedding_files, name, positions):
    assert placeholder.main([str(embedding_files / name), "--prompt", "a photo of * here"]) == 0
    out = capsys.readouterr().out
    assert f"changed at {positions}" in out and "OK: only placeholder positions changed" in out


def test_placeholder_prompt_without_placeholder(capsys, embedding_files):
    assert placeholder.main([str(embedding_files / "e1.pt"), "--prompt", "a photo of a dog"]) == 1
    assert "none of the file's placeholders" in capsys.readouterr().out


@pytest.mark.parametrize("script, argv, expect", [
    ("model", ["--config", "nowhere.yaml"], "config not found: nowhere.yaml"),
    ("model", ["--config", "{bad_yaml}"], "is not valid YAML"),
    ("model", ["--config", "configs/tiny/txt2img-tiny-finetune.yaml", "--ckpt", "{empty}"], "is empty (0 bytes)"),
    ("init_word", ["", "--n_embed", "32", "--n_layer", "1"], "holds no token"),
    ("init_word", ["dog", "--top", "0"], "--top 0 must be greater than 0"),
    ("placeholder", ["nowhere.pt"], "nowhere.pt"),
    ("export_checkpoint", ["nowhere", "--out", "{tmp}/x.safetensors"], "checkpoint not found: nowhere"),
    ("concept_eval", ["--images", "nowhere", "--spec", "dataset/solid_square/concept.json"], "--images nowhere"),
    ("concept_eval", ["--images", "{tmp}", "--spec", "{bad_yaml}"], "is not valid JSON"),
    ("concept_eval", ["--images", "{tmp}", "--spec", "dataset/solid_square/concept.json", "--edit", "x"],
     "--edit 'x' is not in"),
    ("concept_table", ["--concepts", "nope"], "no dataset/<concept>/concept.json for nope: use one of"),
    ("concept_table", ["--n", "0"], "--n 0 must be greater than 0"),
    ("concept_table", ["--variant", "nope"], "no variant 'nope'"),
    ("ablations", ["--variants", "nope"], "no variant 'nope'"),
    ("word_loss", ["--concept", "nope", "--words", "library"], "no dataset/<concept>/concept.json for nope"),
    ("band_probe", ["--concept", "solid_square", "--embedding", "x", "--scale", "nan"], "--scale nan is not a finite"),
    ("sampler_accuracy", ["--steps", "20", "0"], "--steps 0 must be greater than 0"),
])
def test_user_errors_get_one_line_and_exit_2(script, argv, expect, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    files = {"bad_yaml": tmp_path / "bad.yaml", "empty": tmp_path / "empty.ckpt", "tmp": tmp_path}
    with pytest.raises(SystemExit) as info:
        importlib.import_module(f"check.{script}").main([a.format(**files) for a in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and expect in errors[0], errors


def test_debug_shows_the_traceback(monkeypatch):
    from check import model

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(UsageError, match="config not found: nowhere.yaml"):
        model.main(["--config", "nowhere.yaml", "--debug"])
