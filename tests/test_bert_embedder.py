"""LDM BERT text encoder: reference parity, tokenizer ids, checkpoint layout, freezing."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ldm.modules.encoders.modules import BERTEmbedder

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cases(fixture_dir):
    return load_file(str(fixture_dir / "cases.safetensors"))


@pytest.fixture(scope="module")
def metadata(fixture_dir):
    return json.loads((fixture_dir / "cases_index.json").read_text())["metadata"]


@pytest.mark.parametrize("suffix", ["", "_uc"])
def test_parity_with_reference(tiny_bert, cases, suffix):
    with torch.no_grad():
        out = tiny_bert.transformer(cases[f"in.bert.tokens{suffix}"], return_embeddings=True)
    torch.testing.assert_close(out, cases[f"out.bert.embeddings{suffix}"], **TOL)


def test_text_forward_matches_reference(tiny_bert, cases, metadata):
    with torch.no_grad():
        out = tiny_bert.encode(json.loads(metadata["ldm_captions"]))
    torch.testing.assert_close(out, cases["out.bert.embeddings"], **TOL)


def test_tokenizer_ids(tiny_bert, cases, metadata):
    tokens = tiny_bert.tokenize(["a photo of *"])
    assert tokens.shape == (1, 77) and tokens.dtype == torch.int64
    assert tokens[0, :6].tolist() == [101, 1037, 6302, 1997, 1008, 102] and not tokens[0, 6:].any()
    assert torch.equal(tiny_bert.tokenize(json.loads(metadata["ldm_captions"])), cases["in.bert.tokens"])
    assert torch.equal(tiny_bert.tokenize(["", ""]), cases["in.bert.tokens_uc"])
    assert torch.equal(tiny_bert.tokenize(json.loads(metadata["ti_captions"])), cases["in.ti.tokens"])
    assert tiny_bert.word_token_ids("dog") == [3899]
    assert tiny_bert.word_token_ids("teddybear") == [11389, 4783, 2906]
    assert tiny_bert.tokenize(["word " * 200]).shape == (1, 77)


def test_freeze_survives_train(tiny_bert):
    tiny_bert.train()
    assert not tiny_bert.training and not tiny_bert.transformer.attn_layers.training
    assert not any(p.requires_grad for p in tiny_bert.parameters())
    fresh = BERTEmbedder(n_embed=8, n_layer=1, embedding_dropout=0.1)
    assert fresh.train().training and fresh.transformer.emb_dropout.training


def test_meta_build_matches_1p4b_manifest(manifest_dir):
    manifest = json.loads((manifest_dir / "manifest_txt2img-1p4B.json").read_text())["state_dict"]
    prefix = "cond_stage_model."
    expected = [(k[len(prefix):], shape) for k, shape in manifest.items() if k.startswith(prefix)]
    with torch.device("meta"):
        bert = BERTEmbedder(n_embed=1280, n_layer=32, device="cuda")  # `device` from old configs is ignored
    assert [(k, list(v.shape)) for k, v in bert.state_dict().items()] == expected


def test_missing_tokenizer_is_one_clear_line(tmp_path):
    with pytest.raises((OSError, ValueError), match="set tokenizer_path to a local bert-base-uncased folder") as info:
        BERTEmbedder(n_embed=8, n_layer=1, tokenizer_path=str(tmp_path))
    assert "\n" not in str(info.value)


def test_token_ids_without_tokenizer():
    bert = BERTEmbedder(n_embed=8, n_layer=1, use_tokenizer=False)
    assert bert(torch.tensor([[101, 102]])).shape == (1, 2, 8)
    with pytest.raises(RuntimeError, match="use_tokenizer=False"):
        bert.word_token_ids("dog")
