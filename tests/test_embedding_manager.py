"""Textual-inversion EmbeddingManager: reference parity, file formats, validation, gradients."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.placeholders import PER_IMAGE_TOKENS

TOL = dict(atol=1e-5, rtol=1e-5)
STAR = 1008


@pytest.fixture(scope="module")
def cases(fixture_dir):
    return load_file(str(fixture_dir / "cases.safetensors"))


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return tiny_bert


def manager_for(bert, cases, variant):
    """The manager of case (f) `variant`: init, trained1 or trained3."""
    manager = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=3 if variant == "trained3" else 1)
    if variant != "init":
        with torch.no_grad():
            manager.string_to_param_dict["*"].copy_(cases[f"in.ti.{variant}.param"])
    return manager


def run(bert, manager, tokens):
    """-> (manager output, encoder output, tokens after the manager) for a copy of tokens (B, T)."""
    with torch.no_grad():
        edited = tokens.clone()
        manager_out = manager(edited, bert.token_embedding(edited.clone()))
        bert_out = bert.transformer(tokens.clone(), embedding_manager=manager)
    return manager_out, bert_out, edited


@pytest.mark.parametrize("variant", ["init", "trained1", "trained3"])
def test_parity_with_reference(bert, cases, variant):
    manager = manager_for(bert, cases, variant)
    if variant == "init":
        torch.testing.assert_close(manager.string_to_param_dict["*"].detach(), cases["out.ti.init_param"])
    manager_out, bert_out, tokens_after = run(bert, manager, cases["in.ti.tokens"])
    torch.testing.assert_close(manager_out, cases[f"out.ti.{variant}.manager_out"], **TOL)
    torch.testing.assert_close(bert_out, cases[f"out.ti.{variant}.bert_out"], **TOL)
    expected_tokens = cases["out.ti.trained3.tokens_after"] if variant == "trained3" else cases["in.ti.tokens"]
    assert torch.equal(tokens_after, expected_tokens)


def test_only_placeholder_positions_change(bert, cases):
    tokens = cases["in.ti.tokens"]
    manager_out, _, _ = run(bert, manager_for(bert, cases, "trained1"), tokens)
    changed = (manager_out != bert.token_embedding(tokens)).any(-1)
    assert torch.equal(changed, tokens == STAR)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(bert, cases, tmp_path, suffix):
    trained = manager_for(bert, cases, "trained3")
    path = tmp_path / f"embeddings{suffix}"
    trained.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic: no temporary file left
    loaded = EmbeddingManager(bert, ["*"], ["dog"])  # configured for 1 vector: the file's 3 win
    loaded.load(path)
    assert loaded.string_to_param_dict["*"].shape == (3, 32)
    assert int(loaded.string_to_token_dict["*"]) == STAR
    for got, want in zip(run(bert, loaded, cases["in.ti.tokens"]), run(bert, trained, cases["in.ti.tokens"])):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert loaded.embedding_parameters()[0].requires_grad
    assert loaded.embedding_to_coarse_loss() > 0


def test_saved_file_is_the_reference_format(bert, cases, tmp_path):
    manager_for(bert, cases, "trained1").save(tmp_path / "e.pt")
    data = torch.load(tmp_path / "e.pt", weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param"}
    assert data["string_to_token"]["*"].dtype == torch.int64 and int(data["string_to_token"]["*"]) == STAR
    torch.testing.assert_close(data["string_to_param"]["*"], cases["in.ti.trained1.param"])


def test_loads_reference_files_that_pickle_a_parameter_dict(bert, cases, tmp_path):
    params = nn.ParameterDict({"*": nn.Parameter(cases["in.ti.trained1.param"].clone())})
    torch.save({"string_to_token": {"*": torch.tensor(STAR)}, "string_to_param": params}, tmp_path / "ref.pt")
    manager = EmbeddingManager(bert, ["*"], ["dog"])
    manager.load(tmp_path / "ref.pt")
    torch.testing.assert_close(manager.string_to_param_dict["*"].detach(), cases["in.ti.trained1.param"])


def test_width_mismatch_is_one_clear_line(bert, tmp_path):
    torch.save({"string_to_token": {"*": torch.tensor(STAR)}, "string_to_param": {"*": torch.zeros(1, 1280)}},
               tmp_path / "big.pt")
    with pytest.raises(ValueError, match="width 1280 but this model's text encoder uses 32") as info:
        EmbeddingManager(bert, ["*"], ["dog"]).load(tmp_path / "big.pt")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("word, options, message", [
    ("teddybear", dict(init_mode="pieces", num_vectors_per_token=2),
     r"init_mode 'pieces' .* has 3 pieces .* num_vectors_per_token is 2"),
    ("\U0001F642", {}, r"not in the text encoder's vocabulary.*check/init_word.py"),
])
def test_bad_initializer_word(bert, word, options, message):
    with pytest.raises(ValueError, match=message) as info:
        EmbeddingManager(bert, ["*"], [word], **options)
    assert "\n" not in str(info.value)


def test_placeholder_that_is_a_vocabulary_word(bert):
    with pytest.raises(ValueError, match=r"placeholder 'dog' is already the vocabulary token 3899 .*"
                                         r"allow_existing_token") as info:
        EmbeddingManager(bert, ["dog"], ["cat"])
    assert "\n" not in str(info.value)
    assert int(EmbeddingManager(bert, ["dog"], ["cat"], allow_existing_token=True).string_to_token_dict["dog"]) == 3899


def test_gradients_reach_only_the_manager(bert, cases):
    manager = manager_for(bert, cases, "trained3")
    bert.train()  # a frozen encoder stays in eval mode
    out = bert(["a photo of *"], embedding_manager=manager)
    out.square().sum().backward()
    assert not bert.training
    assert all(p.grad is None for p in bert.parameters())
    assert manager.embedding_parameters()[0].grad.abs().sum() > 0
    assert [id(p) for p in manager.embedding_parameters()] == [id(manager.string_to_param_dict["*"])]


def test_coarse_loss(bert, cases):
    manager = manager_for(bert, cases, "init")
    assert manager.embedding_to_coarse_loss().item() == 0
    manager3 = manager_for(bert, cases, "trained3")
    diff = cases["in.ti.trained3.param"] - cases["out.ti.init_param"]
    loss = manager3.embedding_to_coarse_loss()
    assert loss.shape == () and loss.requires_grad
    torch.testing.assert_close(loss.detach(), diff.square().sum())


def test_progressive_words_grow_the_active_vectors(bert, cases):
    manager = manager_for(bert, cases, "trained3")
    manager.progressive_words = True
    tokens = cases["in.ti.tokens"][:1].clone()
    run(bert, manager, tokens)  # counter 1: one vector, tokens unchanged
    assert torch.equal(run(bert, manager, tokens)[2], tokens)
    manager.progressive_counter = 3998  # the next two calls count 3999 (2 vectors) and 4000 (3 vectors)
    assert (run(bert, manager, tokens)[2] == STAR).sum() == 2
    assert (run(bert, manager, tokens)[2] == STAR).sum() == 3


def test_per_image_tokens(bert):
    manager = EmbeddingManager(bert, ["*"], ["dog"], per_image_tokens=True)
    assert list(manager.string_to_token_dict) == ["*", *PER_IMAGE_TOKENS]
    assert len({int(t) for t in manager.string_to_token_dict.values()}) == 1 + len(PER_IMAGE_TOKENS)
    assert list(manager.initial_embeddings) == ["*"]


def test_unrelated_file_is_one_clear_line(bert, fixture_dir):
    with pytest.raises(ValueError, match="is not a textual-inversion embedding file") as info:
        EmbeddingManager(bert, ["*"], ["dog"]).load(fixture_dir / "cases.safetensors")
    assert "\n" not in str(info.value)
