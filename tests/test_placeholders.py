"""Placeholders as new tokens, initializer words, and both injection points, for BERT, CLIP and T5."""
import logging

import pytest
import torch

from ldm.modules.embedding_manager import EmbeddingManager

ENCODERS = ["bert", "clip", "t5"]
INJECTIONS = ["input", "output"]
PROMPT = "a photo of <cat-toy> next to <cat-toy>"


def seam_output(encoder, manager, prompt):
    """Input injection: the token embeddings the manager makes; output: the encoder's final states."""
    with torch.no_grad():
        if manager.injection == "input":
            return manager.input_seam(encoder.tokenize([prompt]), encoder.token_embedding)
        return encoder.encode([prompt], embedding_manager=manager)


def expanded_tokens(encoder, manager, prompt):
    tokens = encoder.tokenize([prompt])
    with torch.no_grad():
        manager.input_seam(tokens, encoder.token_embedding)
    return tokens


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("kind", ENCODERS)
def test_only_placeholder_positions_change(make_encoder, kind, injection):
    encoder = make_encoder(kind)
    manager = EmbeddingManager(encoder, ["<cat-toy>"], ["dog"], num_vectors_per_token=2, injection=injection)
    ids = manager.placeholder_ids["<cat-toy>"]
    assert ids == (encoder.placeholder_token_id("<cat-toy>"), encoder.placeholder_token_id("<cat-toy>_1"))
    before = seam_output(encoder, manager, PROMPT)
    with torch.no_grad():
        manager.string_to_param_dict["<cat-toy>"].add_(1.0)
    changed = (seam_output(encoder, manager, PROMPT) != before).any(-1)[0]
    tokens = expanded_tokens(encoder, manager, PROMPT)[0]
    starts = (tokens == ids[0]).nonzero().flatten()
    assert len(starts) == 2 and (tokens[starts + 1] == ids[1]).all()  # each occurrence became <cat-toy> <cat-toy>_1
    assert torch.equal(changed, torch.isin(tokens, torch.tensor(ids)))


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("kind", ENCODERS)
def test_gradients_reach_only_the_manager(make_encoder, kind, injection):
    encoder = make_encoder(kind)
    manager = EmbeddingManager(encoder, ["<cat-toy>"], ["dog"], injection=injection)
    grad_mode, largest_id = [], []

    def record(module, args, out):
        grad_mode.append(torch.is_grad_enabled())
        largest_id.append(int(args[0].max()))

    hook = encoder.token_embedding.register_forward_hook(record)
    encoder.encode(["a photo of <cat-toy>"], embedding_manager=manager).square().sum().backward()
    hook.remove()
    assert grad_mode == [injection == "input"]  # output injection: no backward through the encoder
    assert largest_id[0] < encoder.token_embedding.num_embeddings  # the new token's id never reaches the table
    assert manager.embedding_parameters()[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("kind", ENCODERS)
def test_initial_vector_is_the_mean_of_the_init_word(make_encoder, kind, injection):
    encoder = make_encoder(kind)
    pieces = encoder.word_token_ids("teddybear")
    assert len(pieces) > 1
    manager = EmbeddingManager(encoder, ["<t>"], ["teddybear"], injection=injection)
    with torch.no_grad():
        if injection == "input":
            rows = encoder.token_embedding.weight[pieces]
        else:  # the encoder's states at the word's pieces in "A photo of a teddybear", found by id
            tokens = encoder.tokenize(["A photo of a teddybear"])[0].tolist()
            start = max(i for i in range(len(tokens)) if tokens[i:i + len(pieces)] == pieces)
            rows = encoder.encode(["A photo of a teddybear"])[0, start:start + len(pieces)]
    torch.testing.assert_close(manager.string_to_param_dict["<t>"].detach(), rows.mean(0, keepdim=True))
    torch.testing.assert_close(manager.embedding_to_coarse_loss(), torch.tensor(0.0))


@pytest.mark.parametrize("kind", ENCODERS)
def test_several_output_vectors_start_from_each_occurrence_and_stay_apart(make_encoder, kind):
    """Cross-attention sees no position in its context: equal output vectors would train as one."""
    encoder = make_encoder(kind)
    pieces = encoder.word_token_ids("teddybear")
    manager = EmbeddingManager(encoder, ["<t>"], ["teddybear"], num_vectors_per_token=3, injection="output")
    prompt = "A photo of a teddybear teddybear teddybear"
    with torch.no_grad():
        tokens = encoder.tokenize([prompt])[0].tolist()
        start = max(i for i in range(len(tokens)) if tokens[i:i + 3 * len(pieces)] == pieces * 3)
        states = encoder.encode([prompt])[0, start:start + 3 * len(pieces)]
    vectors = manager.string_to_param_dict["<t>"]
    torch.testing.assert_close(vectors.detach(), states.unflatten(0, (3, -1)).mean(1))
    torch.manual_seed(0)  # one cross-attention read of the context, positions unseen
    keys, values, query = torch.nn.Linear(vectors.shape[-1], 8), torch.nn.Linear(vectors.shape[-1], 8), torch.randn(8)
    context = encoder.encode(["a photo of <t>"], embedding_manager=manager)[0]
    (keys(context) @ query).softmax(0).matmul(values(context)).square().sum().backward()
    grads = vectors.grad
    assert torch.cdist(vectors.detach(), vectors.detach()).triu(1).max() > 0
    assert torch.cdist(grads, grads).triu(1).max() > 0


@pytest.mark.parametrize("kind", ENCODERS)
def test_pieces_mode_gives_one_piece_per_vector(make_encoder, kind):
    encoder = make_encoder(kind)
    pieces = encoder.word_token_ids("teddybear")
    manager = EmbeddingManager(encoder, ["<t>"], ["teddybear"], num_vectors_per_token=len(pieces), init_mode="pieces")
    assert torch.equal(manager.string_to_param_dict["<t>"].detach(), encoder.token_embedding.weight[pieces])
    with pytest.raises(ValueError, match="init_mode 'pieces'") as info:
        EmbeddingManager(encoder, ["<u>"], ["teddybear"], num_vectors_per_token=len(pieces) + 1, init_mode="pieces")
    assert "\n" not in str(info.value)


def test_random_and_zero_init_without_a_word(make_encoder):
    encoder = make_encoder("bert")
    zero = EmbeddingManager(encoder, ["<z>"], None, num_vectors_per_token=2, init_mode="zero")
    assert not zero.string_to_param_dict["<z>"].any() and not zero.initial_embeddings
    rand = EmbeddingManager(encoder, ["<r>"], None, init_mode="random").string_to_param_dict["<r>"]
    assert rand.shape == (1, 32) and ((rand >= 0) & (rand < 1)).all() and rand.any()
    with pytest.raises(ValueError, match="init_mode 'zero' starts '<q>' without an initializer word") as info:
        EmbeddingManager(encoder, ["<q>"], ["dog"], init_mode="zero")
    assert "\n" not in str(info.value)


def test_a_new_word_does_not_split_other_words(make_encoder):
    bert = make_encoder("bert")
    asks = bert.tokenize(["asks about tasks"])
    assert len(bert.word_token_ids("sks")) == 2
    manager = EmbeddingManager(bert, ["sks"], ["dog"])
    sks = manager.placeholder_ids["sks"][0]
    assert sks >= bert.token_embedding.num_embeddings  # a new id; the table is not resized
    assert bert.token_embedding.num_embeddings == 30522
    assert torch.equal(bert.tokenize(["asks about tasks"]), asks)
    assert bert.tokenize(["a sks dog"])[0, 1:4].tolist() == [1037, sks, 3899]


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_a_vocabulary_word_needs_allow_existing_token(make_encoder, kind):
    encoder = make_encoder(kind)
    dog = encoder.word_token_ids("dog")[0]
    with pytest.raises(ValueError, match=f"placeholder 'dog' is already the vocabulary token {dog} .*"
                                         "allow_existing_token") as info:
        EmbeddingManager(encoder, ["dog"], ["cat"])
    assert "\n" not in str(info.value)
    assert EmbeddingManager(encoder, ["dog"], ["cat"], allow_existing_token=True).placeholder_ids["dog"] == (dog,)


def test_a_symbol_placeholder_keeps_its_vocabulary_token(make_encoder):
    clip = make_encoder("clip")
    manager = EmbeddingManager(clip, ["*"], ["dog"], num_vectors_per_token=3)
    assert manager.placeholder_ids["*"] == (265, 265, 265) and clip.placeholder_token_id("*") is None
    tokens = expanded_tokens(clip, manager, "a photo of *")
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 265, 265, 265, 49407]


def test_two_placeholders_with_one_token_is_one_clear_line(make_encoder):
    with pytest.raises(ValueError, match="placeholders '<a>' and '<a>' are the same token") as info:
        EmbeddingManager(make_encoder("t5"), ["<a>", "<a>"], ["dog", "cat"])
    assert "\n" not in str(info.value)


def test_a_placeholder_no_manager_holds_is_one_clear_line(make_encoder):
    bert = make_encoder("bert")
    first = EmbeddingManager(bert, ["<a>"], ["dog"])
    EmbeddingManager(bert, ["<b>"], ["dog"])  # registers <b> in the same tokenizer
    with pytest.raises(ValueError, match="a placeholder this manager no longer holds") as info:
        bert.encode(["a photo of <b>"], embedding_manager=first)
    assert "\n" not in str(info.value)


def test_txt2img_warns_when_the_prompt_lacks_a_multi_token_placeholder(make_encoder, caplog):
    from ldm.inference import warn_missing_placeholder

    class Model:
        embedding_manager = EmbeddingManager(make_encoder("clip"), ["<cat-toy>"], ["toy"])

    with caplog.at_level(logging.WARNING):
        warn_missing_placeholder(Model, "a photo of a cat toy")
    assert "does not contain the learned placeholder <cat-toy>" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_missing_placeholder(Model, "a photo of <cat-toy>")
    assert not caplog.text


def test_train_new_allow_existing_token_flag():
    import train_new
    from ldm.training import TrainOptions, build_config

    base = ["--base", "configs/stable-diffusion/v1-finetune.yaml", "--placeholder_string", "sks"]
    for extra, expected in (([], False), (["--allow_existing_token"], True)):
        opt, dotlist = train_new.get_parser().parse_known_args(base + extra)
        config = build_config(TrainOptions(**vars(opt)), dotlist)
        assert config.model.params.personalization_config.params.allow_existing_token is expected


@pytest.mark.parametrize("placeholder", ["", "  ", "<my.cat>"])
def test_unusable_placeholder_strings_are_one_clear_line(make_encoder, placeholder):
    with pytest.raises(ValueError, match="is empty or holds a '.'") as info:
        EmbeddingManager(make_encoder("bert"), [placeholder], ["dog"])
    assert "\n" not in str(info.value)
