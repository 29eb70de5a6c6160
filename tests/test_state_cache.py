"""Output injection memoises the frozen encoder's states per caption, tokenizers their ids: never stale ones."""
import pytest
import torch

from ldm.modules.embedding_manager import EmbeddingManager

CAPTIONS = ["a photo of a *", "a rendering of a *", "a photo of a *"]


@pytest.fixture
def counted(make_encoder):
    """A frozen tiny BERT, an output-injection manager on it, and a list that grows by one per encoder pass."""
    encoder = make_encoder("bert")
    manager = EmbeddingManager(encoder, ["*"], ["dog"], num_vectors_per_token=2, injection="output")
    passes = []
    encoder.token_embedding.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    return encoder, manager, passes


def uncached(encoder, manager, captions):
    """The same states computed afresh (an emptied cache)."""
    manager.state_cache.rows.clear()
    return encoder.encode(captions, embedding_manager=manager)


def test_repeated_captions_reuse_the_states_exactly(counted):
    encoder, manager, passes = counted
    first = encoder.encode(CAPTIONS, embedding_manager=manager)
    assert passes == [1, 1]  # the repeated caption is encoded once; each caption on its own
    again = encoder.encode(CAPTIONS[::-1] + ["a photo of a dog"], embedding_manager=manager)
    assert passes == [1, 1, 1]  # only the new caption
    assert torch.equal(again[:3], first.flip(0))
    assert torch.equal(again, uncached(encoder, manager, CAPTIONS[::-1] + ["a photo of a dog"]))


def test_vectors_still_learn_through_cached_states(counted):
    encoder, manager, passes = counted
    encoder.encode(CAPTIONS, embedding_manager=manager)
    vectors = manager.embedding_parameters()[0]
    encoder.encode(CAPTIONS, embedding_manager=manager).square().sum().backward()
    assert passes == [1, 1] and vectors.grad.abs().sum() > 0


def test_new_weights_empty_the_cache(counted):
    encoder, manager, passes = counted
    before = encoder.encode(CAPTIONS, embedding_manager=manager)
    state = {k: v + 0.01 for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(state)  # copied in place: the same storages, new version counters
    after = encoder.encode(CAPTIONS, embedding_manager=manager)
    assert passes == [1] * 4 and not torch.equal(after, before)
    with torch.no_grad():
        encoder.token_embedding.weight[0] += 1.0
    encoder.encode(CAPTIONS, embedding_manager=manager)
    assert passes == [1] * 6


def test_autocast_and_training_mode_bypass_or_separate_the_cache(counted):
    encoder, manager, passes = counted
    encoder.encode(CAPTIONS, embedding_manager=manager)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 states are kept apart from the fp32 ones
        encoder.encode(CAPTIONS, embedding_manager=manager)
        encoder.encode(CAPTIONS, embedding_manager=manager)
    assert passes == [1] * 4
    encoder.frozen = False
    encoder.train()  # dropout may be active: nothing is cached
    encoder.encode(CAPTIONS, embedding_manager=manager)
    encoder.encode(CAPTIONS, embedding_manager=manager)
    assert passes == [1] * 4 + [3, 3]


def test_tokenizer_memo_follows_added_placeholders(make_encoder):
    encoder = make_encoder("bert")
    before = encoder.tokenize(["a photo of <new-thing>", "a photo of <new-thing>"])
    new_id = encoder.add_placeholder_token("<new-thing>")
    after = encoder.tokenize(["a photo of <new-thing>"])
    assert new_id not in before and new_id in after
    after[0, 0] = -1  # the caller's tensor is its own: the memo keeps the ids
    assert torch.equal(encoder.tokenize(["a photo of <new-thing>"])[0, 1:], after[0, 1:])
    assert encoder.tokenize(["a photo of <new-thing>"])[0, 0] != -1
