"""Improvement v2: the pair corpus, a tiny multilingual pre-encoder built from config, the aligner's training
command, the shipped aligner (held-out alignment, `*` passing through) and TI through the v2 conditioner."""
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from improvement.v2 import corpus
from improvement.v2.pre_BERT import MultilingualBERTEmbedder
from improvement.v2.train_aligner import main as train_aligner
from improvement.v2.train_aligner import train_wordpiece
from ldm.cli import UsageError
from load import load_model_from_config
from train_new_v2 import V2

PAIRS = "dataset/ko_en/pairs.tsv"
MODEL = "models/ldm/tiny-shapes"
TINY_V2 = {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 64, "max_position_embeddings": 64}}


def test_shipped_corpus_is_what_the_generator_writes(tmp_path):
    corpus.write_pairs(str(tmp_path / "pairs.tsv"), corpus.build_pairs())
    assert (tmp_path / "pairs.tsv").read_text(encoding="utf-8") == open(PAIRS, encoding="utf-8").read()
    train, held = corpus.read_pairs(PAIRS, "train"), corpus.read_pairs(PAIRS, "heldout")
    assert len(train) + len(held) >= 300 and len(held) >= 50
    assert not set(held) & set(train)
    train_words = {w for ko, _ in train for w in ko.split()}
    assert {w for ko, _ in held for w in ko.split()} <= train_words  # held out: combinations, not words
    assert ("*의 사진", "a photo of a *") in train


def test_translate_prompt_covers_the_concept_prompts():
    assert corpus.translate_prompt("a photo of a *") == "*의 사진"
    assert corpus.translate_prompt("a photo of a blue *") == "파란 *의 사진"
    assert (corpus.translate_prompt("a photo of the cool red circle in the kitchen")
            == "그 멋진 부엌에 있는 빨간 원의 사진")
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        corpus.translate_prompt("an oil painting of a dog")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    texts = [t for pair in corpus.read_pairs(PAIRS) for t in pair if t]
    return train_wordpiece(texts, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"), vocab_size=300)


def test_tiny_pre_encoder_from_config_keeps_hangul_whole(tokenizer_file):
    cond = MultilingualBERTEmbedder(64, 2, pre_encoder={**TINY_V2, "tokenizer": tokenizer_file},
                                    target_ids=[0, 101, 102, 1008], aligner={"dim": 32, "depth": 1})
    pieces = cond.pre_tokenizer.tokenize("부엌에 있는 빨간 원의 사진")
    assert "[UNK]" not in pieces and all(not ("\u1100" <= ch <= "\u11ff") for p in pieces for ch in p)  # no jamo
    with torch.no_grad():
        out = cond(["빨간 원의 사진", "a photo of a red circle"])
    assert out.shape == (2, 77, 64)


def test_aligner_training_command_writes_files_that_load_back(tmp_path):
    v2 = tmp_path / "v2.yaml"
    OmegaConf.save({"model": {"params": {"cond_stage_config": {
        "target": "improvement.v2.pre_BERT.MultilingualBERTEmbedder",
        "params": {"pre_encoder": TINY_V2, "aligner": {"dim": 32, "depth": 1, "heads": 2}}}}}}, str(v2))
    report = train_aligner(["--v2", str(v2), "--out", str(tmp_path / "out"), "--steps", "30", "--batch_size", "16",
                            "--log_every", "10"])
    assert set(report["heldout_korean"]) == {"cos_soft", "cos_hard", "token_acc", "exact"}
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["steps"] == 30
    back = MultilingualBERTEmbedder(64, 2, pre_encoder=str(out / "pre_encoder"), aligner={"dim": 32, "depth": 1,
                                    "heads": 2}, aligner_ckpt=str(out / "aligner.safetensors"))
    assert len(back.aligner.target_ids) > 30
    with pytest.raises(UsageError, match="does not fit this v2 conditioner"):
        MultilingualBERTEmbedder(64, 2, pre_encoder=str(out / "pre_encoder"), aligner={"dim": 48, "depth": 1},
                                 aligner_ckpt=str(out / "aligner.safetensors"))


@pytest.fixture(scope="module")
def v2_model():
    config = OmegaConf.merge(OmegaConf.load(f"{MODEL}/config.yaml"),
                             OmegaConf.load("configs/tiny-shapes/finetune.yaml"),
                             OmegaConf.load(V2))
    return load_model_from_config(config, f"{MODEL}/model.safetensors", strict=True).eval()


def test_shipped_aligner_matches_english_on_heldout_korean(v2_model):
    cond = v2_model.cond_stage_model
    held = corpus.read_pairs(PAIRS, "heldout")[:64]
    with torch.no_grad():
        cos = F.cosine_similarity(cond([ko for ko, _ in held]), cond.english([en for _, en in held]), dim=-1)
    assert cos.mean() >= 0.9


def test_learned_placeholder_passes_through_korean_prompts(v2_model):
    cond, manager = v2_model.cond_stage_model, v2_model.embedding_manager
    vectors = manager.string_to_param_dict["*"]
    saved = vectors.detach().clone()
    with torch.no_grad():
        before = cond(["*의 사진"], embedding_manager=manager)
        english = cond.english(["a photo of a *"], embedding_manager=manager)
        vectors.add_(torch.randn_like(vectors))
        after = cond(["*의 사진"], embedding_manager=manager)
        english_after = cond.english(["a photo of a *"], embedding_manager=manager)
        vectors.copy_(saved)
    assert not torch.allclose(before, after)  # the learned vectors reach the Korean conditioning
    for ko, en in ((before, english), (after, english_after)):
        assert F.cosine_similarity(ko, en, dim=-1).mean() >= 0.9


def test_ti_through_v2_trains_only_the_vector(tmp_path):
    import train_new
    from train_new_v1 import TINY

    run = train_new.main(["-t", "--actual_resume", f"{MODEL}/model.safetensors", "-n", "v2", "--data_root",
                          "dataset/solid_square", "--init_word", "square", "--placeholder_string", "*",
                          "-l", str(tmp_path), "lightning.trainer.max_steps=2", "data.params.batch_size=2"],
                         default_base=TINY, overlays=(V2,))
    model = run.model
    fresh = load_model_from_config(OmegaConf.merge(*[OmegaConf.load(c) for c in (*TINY, V2)]),
                                   f"{MODEL}/model.safetensors")
    reference = fresh.state_dict()
    state = model.state_dict()
    manager = model.embedding_manager
    assert not torch.equal(manager.string_to_param_dict["*"],
                           manager.initial_embeddings["*"]), "the vector did not move"
    frozen = [k for k in state if not k.startswith("embedding_manager.")]
    assert any(k.startswith("cond_stage_model.aligner.") for k in frozen)
    for key in frozen:
        assert torch.equal(state[key], reference[key]), f"{key} changed"
