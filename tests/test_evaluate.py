"""check/evaluate.py: the TI paper's CLIP image and text similarities of every checkpoint of a run, with a tiny random
CLIP model saved by transformers (no hub), on the tiny reference LDM and on the shipped shapes-world model."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tiny_text_encoders import TINY_CLIP, clip_tokenizer_folder

from check import evaluate
from ldm.cli import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "models", "ldm", "tiny-shapes")
SHAPES_TI = os.path.join(REPO, "configs", "tiny-shapes", "finetune.yaml")
CONCEPT = os.path.join(REPO, "dataset", "solid_square")
TINY = ["--n", "2", "--steps", "2", "--batch_size", "2"]  # samples per prompt, sampler steps


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A 2-layer, width-32 CLIPModel (text and vision towers, 16-d joint space) with OpenAI CLIP's tokenizer files."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=TINY_CLIP, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    clip_tokenizer_folder(folder)
    return str(folder)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The user's own images of the concept: two non-square photos of a red square."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(2):
        arr = np.full((20, 28, 3), 90 + 40 * i, np.uint8)
        arr[4:16, 8:20] = (220, 40, 40)
        Image.fromarray(arr).save(folder / f"photo{i}.png")
    return str(folder)


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _similarities_in_range(rows):
    values = [float(r[k]) for r in rows for k in ("image_similarity", "text_similarity")]
    return all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in values)


def test_every_checkpoint_of_a_run_gets_a_row_a_point_and_a_csv_line(train_tiny, tiny_concept, clip_dir, photos,
                                                                   tmp_path, capsys):
    run = train_tiny(tiny_concept, tmp_path / "logs", "lightning.trainer.max_steps=4",
                     "lightning.modelcheckpoint.params.every_n_train_steps=2",
                     "lightning.callbacks.image_logger.params.batch_frequency=100", "--no-test").logdir
    capsys.readouterr()
    rows = evaluate.main([run, "--images", photos, "--clip", clip_dir, *TINY])
    out = capsys.readouterr().out.splitlines()
    # embeddings.pt holds the last step's vectors: no row of its own
    assert [r["step"] for r in rows] == ["2", "4"]
    assert out[0] == "| step | embedding | image_similarity | text_similarity |"
    assert [line.split(" | ")[1] for line in out[2:4]] == ["embeddings_gs-2.pt", "embeddings_gs-4.pt"]
    plot, table = os.path.join(run, "evaluation.png"), os.path.join(run, "evaluation.csv")
    assert out[4:] == [f"plot: {plot}", f"csv: {table}"]
    assert Image.open(plot).format == "PNG"
    written = _csv_rows(table)
    assert [r["step"] for r in written] == ["2", "4"] and _similarities_in_range(written)
    with pytest.raises(SystemExit) as refused:  # an existing plot is kept
        evaluate.main([run, "--images", photos, "--clip", clip_dir, *TINY])
    assert refused.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_a_shapes_concept_adds_the_readers_fidelity_and_editability(clip_dir, tmp_path, capsys):
    with open(os.path.join(CONCEPT, "concept.json")) as f:
        spec = json.load(f)
    config = OmegaConf.merge(OmegaConf.load(os.path.join(SHAPES, "config.yaml")), OmegaConf.load(SHAPES_TI))
    config.model.params.personalization_config.params.initializer_words = [spec["init_word"]]
    embedding = str(tmp_path / "square.pt")
    evaluate.load_model_from_config(config, None).embedding_manager.save(embedding)
    out = str(tmp_path / "eval.png")
    rows = evaluate.main([embedding, "--config", os.path.join(SHAPES, "config.yaml"), SHAPES_TI, "--ckpt_path",
                          os.path.join(SHAPES, "model.safetensors"), "--images", CONCEPT, "--clip", clip_dir,
                          "--out", out, *TINY])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| step | embedding | image_similarity | text_similarity | fidelity | editability |"
    assert len(rows) == 1 and rows[0]["step"] == "-" and rows[0]["embedding"] == "square.pt"
    assert all(0.0 <= rows[0][k] <= 1.0 for k in ("fidelity", "editability"))
    written = _csv_rows(str(tmp_path / "eval.csv"))
    assert list(written[0]) == ["step", "embedding", "image_similarity", "text_similarity", "fidelity",
                                "editability"]
    assert _similarities_in_range(written) and os.path.isfile(out)


def test_checkpoints_prompts_and_clip_folders(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name, data in (("embeddings_gs-10.pt", b"b"), ("embeddings_gs-5.pt", b"a"), ("embeddings.pt", b"c")):
        (folder / name).write_bytes(data)
    assert [s for s, _ in evaluate.run_checkpoints(str(tmp_path / "run"))] == ["5", "10", "final"]
    (folder / "embeddings.pt").write_bytes(b"b")
    assert [s for s, _ in evaluate.run_checkpoints(str(tmp_path / "run"))] == ["5", "10"]
    assert evaluate.prompt_text("a photo of * on the beach") == "a photo of on the beach"
    assert evaluate.center_square(np.zeros((20, 28, 3), np.uint8)).shape == (20, 20, 3)
    assert evaluate.padded_limits([0.5, 0.5]) == pytest.approx((0.49, 0.51))
    open_clip = tmp_path / "open_clip"
    open_clip.mkdir()
    (open_clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    assert evaluate.clip_class(str(open_clip)) is evaluate.OpenClip
    with pytest.raises(UsageError, match="ending in .png, .pdf, .svg"):
        evaluate.plot_format("evaluation.csv")


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "check/evaluate.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_user_errors_are_one_line_and_exit_2(clip_dir, photos, tmp_path):
    not_clip = tmp_path / "bert"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    folder_hint = "CLIPModel.save_pretrained (clip-vit-base-patch32 / clip-vit-large-patch14)"
    cases = [([str(tmp_path), "--images", photos], ("--clip is required", folder_hint)),
             ([str(tmp_path), "--images", photos, "--clip", str(not_clip)],
              ("is not a CLIP model folder", folder_hint)),
             ([str(tmp_path / "no_run"), "--images", photos, "--clip", clip_dir], ("not found: give a run folder",))]
    for args, expected in cases:
        result = _run(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and all(e in lines[0] for e in expected), lines[0]
