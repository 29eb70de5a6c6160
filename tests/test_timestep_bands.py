"""Timestep-banded textual inversion: one set of vectors per band of diffusion timesteps."""
import pytest
import torch

from ldm.merge import merge
from ldm.models.diffusion.sampling import guided_eps
from ldm.modules.embedding_formats import EmbeddingFileError, read_embeddings, write_embeddings
from ldm.modules.embedding_manager import EmbeddingManager

BANDS = "model.params.personalization_config.params.timestep_bands=[400]"


@pytest.fixture(scope="module")
def banded(train_tiny, tiny_concept, tmp_path_factory):
    """A 10-step TI run with bands [0, 400) and [400, 1000), then its model."""
    return train_tiny(tiny_concept, tmp_path_factory.mktemp("logs"), BANDS, "lightning.trainer.max_steps=10")


def test_manager_holds_one_set_per_band_and_writes_the_current_one(tiny_bert):
    manager = EmbeddingManager(tiny_bert, ["*"], ["dog"], num_vectors_per_token=2, timestep_bands=[400])
    param = manager.string_to_param_dict["*"]
    assert manager.num_bands == 2 and param.shape == (4, tiny_bert.token_embedding.weight.shape[1])
    assert torch.equal(param[:2], param[2:])  # both bands start from the init word
    with torch.no_grad():
        param[2:] += 1.0
    tokens = tiny_bert.tokenize(["a photo of *"])
    written = []
    for band in (0, 1):
        edited = tokens.clone()
        written.append(manager.input_seam(edited, tiny_bert.token_embedding, band=band))
    at_star = torch.isin(edited, torch.tensor(manager.placeholder_ids["*"]))
    assert at_star.sum() == 2
    diff = written[1] - written[0]
    assert torch.allclose(diff[at_star], torch.ones_like(diff[at_star])) and diff[~at_star].abs().max() == 0


@pytest.mark.parametrize("bad", [[0], [500, 400], [-3]])
def test_bad_band_edges_are_refused(tiny_bert, bad):
    with pytest.raises(ValueError, match=r"timestep_bands=.*increasing positive"):
        EmbeddingManager(tiny_bert, ["*"], ["dog"], timestep_bands=bad)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_banded_file_round_trip_and_load_into_an_unbanded_manager(tiny_bert, tmp_path, suffix):
    manager = EmbeddingManager(tiny_bert, ["*"], ["dog"], num_vectors_per_token=2, timestep_bands=[300, 700])
    with torch.no_grad():
        manager.string_to_param_dict["*"].copy_(torch.randn(6, manager.token_dim))
    path = tmp_path / f"banded{suffix}"
    manager.save(path)
    assert read_embeddings(path).fields["timestep_bands"] == [300, 700]
    other = EmbeddingManager(tiny_bert, ["*"], ["dog"])  # built without bands, as txt2img builds it
    other.load(path)
    assert other.timestep_bands == (300, 700) and other.placeholder_ids["*"] == manager.placeholder_ids["*"]
    assert torch.equal(other.string_to_param_dict["*"], manager.string_to_param_dict["*"])
    with pytest.raises(EmbeddingFileError, match="one set per timestep band"):
        write_embeddings(read_embeddings(path), tmp_path / "a1111.pt", "a1111")


def test_merge_refuses_files_of_other_bands(tiny_bert, tmp_path):
    for name, bands in (("a", [400]), ("b", [400]), ("c", None)):
        m = EmbeddingManager(tiny_bert, [f"<{name}>"], ["dog"], timestep_bands=bands)
        m.save(tmp_path / f"{name}.pt")
    assert merge([tmp_path / "a.pt", tmp_path / "b.pt"]).fields["timestep_bands"] == [400]
    with pytest.raises(ValueError, match="timestep bands"):
        merge([tmp_path / "a.pt", tmp_path / "c.pt"])


def test_each_sample_trains_only_the_vectors_of_its_timestep_band(banded, monkeypatch):
    model = banded.model
    param = model.embedding_manager.string_to_param_dict["*"]
    assert model.embedding_manager.timestep_bands == (400,) and param.shape[0] == 2
    assert not torch.equal(param[0], param[1])  # trained apart
    batch = next(iter(banded.trainer.datamodule.train_dataloader()))
    for lo, hi, trained_row in ((0, 400, 0), (400, 1000, 1)):
        monkeypatch.setattr(model, "train_timesteps", (lo, hi))
        param.grad = None
        model.shared_step(batch)[0].backward()
        assert param.grad[trained_row].abs().sum() > 0 and param.grad[1 - trained_row].abs().sum() == 0


def test_a_mixed_batch_encodes_each_row_with_its_own_band(banded):
    model = banded.model
    captions = ["a photo of *", "a good photo of a *", "a photo of *"]
    band = torch.tensor([1, 0, 0])
    passes = []
    with torch.no_grad():
        per_band = model.banded_conditioning(captions)
        hook = model.cond_stage_model.token_embedding.register_forward_hook(lambda m, a, o: passes.append(len(o)))
        mixed = model.conditioning_by_band(captions, band)
        hook.remove()
    expected = torch.stack([per_band[k][i] for i, k in enumerate(band.tolist())])
    assert torch.allclose(mixed, expected, atol=1e-6) and not torch.allclose(mixed[0], mixed[2])
    assert passes == [3]  # one pass of the encoder over the three distinct (caption, band) rows


def test_edges_past_the_schedule_are_refused(banded, monkeypatch):
    monkeypatch.setattr(banded.model.embedding_manager, "timestep_bands", (1000,))
    with pytest.raises(ValueError, match="reach past this model's 1000 timesteps"):
        banded.model.timestep_band(torch.tensor([5]))


def test_sampling_uses_each_band_at_its_timesteps(banded):
    model = banded.model
    seen = []
    original = model.apply_model

    def spy(x, t, c):
        seen.append((int(t[0]), c))
        return original(x, t, c)

    model.apply_model = spy
    try:
        contexts = model.banded_conditioning(["a photo of *"])
        eps = guided_eps(model, contexts, model.get_learned_conditioning([""]), scale=3.0)
        x = torch.randn(1, model.channels, model.image_size, model.image_size)
        with torch.no_grad():
            eps(x, torch.tensor([999])), eps(x, torch.tensor([400])), eps(x, torch.tensor([399]))
    finally:
        del model.apply_model
    assert [torch.equal(c[1:], contexts[1]) for _, c in seen] == [True, True, False]
    assert torch.equal(seen[2][1][1:], contexts[0]) and not torch.equal(contexts[0], contexts[1])


def test_models_without_timesteps_refuse_banded_vectors(tiny_bert):
    from ldm.models.textual_inversion import TextConditionedModel

    model = TextConditionedModel()
    model.cond_stage_model = tiny_bert
    model.embedding_manager = EmbeddingManager(tiny_bert, ["*"], ["dog"], timestep_bands=[400])
    with pytest.raises(ValueError, match="has no timesteps"):
        model.get_learned_conditioning(["a photo of *"])


def test_band_overlap_trains_each_set_past_its_edge_and_sampling_keeps_hard_edges(banded, monkeypatch):
    """band_overlap=w: a t within w of an edge trains either side's vectors, 50/50; farther away, only its own."""
    model = banded.model
    t = torch.full((4000,), 350)
    assert torch.equal(model.jitter_for_bands(t), t)  # default 0: hard edges
    monkeypatch.setattr(model, "band_overlap", 100)
    assert 0.45 < model.timestep_band(model.jitter_for_bands(t)).float().mean() < 0.55
    assert model.timestep_band(model.jitter_for_bands(torch.full((500,), 299))).max() == 0
    assert model.timestep_band(model.jitter_for_bands(torch.full((500,), 500))).min() == 1
    assert model.timestep_band(torch.tensor([399, 400])).tolist() == [0, 1]  # what sampling asks: hard edges


@pytest.mark.parametrize("bad", [-1, 1000])
def test_band_overlap_outside_the_schedule_is_refused(bad):
    from ldm.models.diffusion.ddpm import _band_overlap

    with pytest.raises(ValueError, match=f"band_overlap={bad} is not a timestep count"):
        _band_overlap(bad, 1000)


def test_band_probe_places_the_low_and_high_sets():
    from check.band_probe import placed

    v = torch.arange(8.0).reshape(4, 2)  # two vectors per band: rows 0-1 low, rows 2-3 high
    assert torch.equal(placed(v, "as-trained"), v)
    assert torch.equal(placed(v, "high-everywhere"), torch.cat([v[2:], v[2:]]))
    assert torch.equal(placed(v, "low-everywhere"), torch.cat([v[:2], v[:2]]))
