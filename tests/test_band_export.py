"""Banded vectors (one set per timestep band) leave the original format only by an explicit choice of set:
check/convert_embedding.py --band N or --band_at T; without one, one error line naming --band."""
from types import SimpleNamespace

import pytest
import torch

from check.convert_embedding import convert, main
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.embedding_bands import band_at, select_band
from ldm.modules.embedding_formats import EmbeddingFileError, Embeddings, read_embeddings, write_embeddings

EDGES = [300, 700]
N = 2  # vectors per band


@pytest.fixture
def banded(tmp_path):
    """An original-format file of '<toy>' with three bands of two 8-wide vectors -> (path, (3 * 2, 8) vectors)."""
    vectors = torch.randn(len(EDGES) + 1, N, 8, generator=torch.Generator().manual_seed(0)).flatten(0, 1)
    path = tmp_path / "banded.pt"
    write_embeddings(Embeddings({"<toy>": vectors}, {}, {"timestep_bands": EDGES}), path)
    return path, vectors


@pytest.mark.parametrize("fmt, dst", [("diffusers", "concept"), ("a1111", "toy.pt"), ("kohya", "toy.safetensors")])
def test_export_without_a_choice_is_one_error_line(banded, tmp_path, capsys, fmt, dst):
    with pytest.raises(SystemExit) as info:
        main([str(banded[0]), str(tmp_path / dst), "--to", fmt])
    errors = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(errors) == 1
    assert errors[0].startswith("error: ") and "--band" in errors[0] and str(EDGES) in errors[0]
    assert not (tmp_path / dst).exists()


@pytest.mark.parametrize("fmt, dst", [("diffusers", "concept"), ("a1111", "toy.pt"), ("kohya", "toy.safetensors")])
@pytest.mark.parametrize("band", range(len(EDGES) + 1))
def test_band_exports_that_set(banded, tmp_path, fmt, dst, band):
    path, vectors = banded
    convert(path, tmp_path / dst, fmt, name="<toy>", band=band)
    back = read_embeddings(tmp_path / dst, name="<toy>")
    assert torch.equal(back.matrices()["<toy>"], vectors[band * N:(band + 1) * N])
    assert "timestep_bands" not in back.fields


def model_band(t):
    """The band LatentDiffusion.timestep_band gives timestep t with EDGES (the set a sampling step conditions on)."""
    fake = SimpleNamespace(embedding_manager=SimpleNamespace(timestep_bands=tuple(EDGES)), num_timesteps=1000)
    return int(LatentDiffusion.timestep_band(fake, torch.tensor([t]))[0])


@pytest.mark.parametrize("t", [0, EDGES[0] - 1, EDGES[0], EDGES[1] - 1, EDGES[1], 999])
def test_band_at_is_the_set_the_model_samples_with(banded, tmp_path, t):
    path, vectors = banded
    assert band_at(EDGES, t) == model_band(t)
    convert(path, tmp_path / "toy.pt", "a1111", band_at=t)
    back = read_embeddings(tmp_path / "toy.pt")
    band = model_band(t)
    assert torch.equal(back.matrices()["<toy>"], vectors[band * N:(band + 1) * N])


def test_original_keeps_every_band_unless_one_is_chosen(banded, tmp_path):
    path, vectors = banded
    convert(path, tmp_path / "all.safetensors", "original")
    assert read_embeddings(tmp_path / "all.safetensors").fields["timestep_bands"] == EDGES
    convert(path, tmp_path / "one.pt", "original", band=2)
    one = read_embeddings(tmp_path / "one.pt")
    assert "timestep_bands" not in one.fields and torch.equal(one.matrices()["<toy>"], vectors[2 * N:])


@pytest.mark.parametrize("kwargs, expect", [
    ({"band": 3}, "--band 3 does not exist: these vectors hold bands 0 to 2"),
    ({"band": -1}, "--band -1 does not exist"),
    ({"band": 0, "timestep": 10}, "give one of them"),
    ({"timestep": -5}, "--band_at -5 is negative"),
])
def test_an_impossible_choice_is_one_line(banded, kwargs, expect):
    with pytest.raises(EmbeddingFileError, match=expect):
        select_band(read_embeddings(banded[0]), **kwargs)


def test_vectors_without_bands_take_band_0_only(tmp_path):
    vectors = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    emb = Embeddings({"<toy>": vectors})
    assert all(select_band(emb, **k).vectors["<toy>"].equal(vectors) for k in ({"band": 0}, {"timestep": 900}))
    with pytest.raises(EmbeddingFileError, match="one set of vectors"):
        select_band(emb, band=1)
