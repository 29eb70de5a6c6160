"""One timestep band's vectors out of a banded embedding, for tools that use one set at every sampling step.

An embedding trained with `timestep_bands: [e_1, ..., e_k]` holds k + 1 sets of n vectors per placeholder, stacked
as (bands * n, D): band 0 serves timesteps [0, e_1), band k timesteps [e_k, T). diffusers, A1111 and kohya read one
set, so exporting to them takes an explicit choice, never a silent one (write_embeddings refuses banded vectors in
any other format):

    single = select_band(emb, band=1)        # the second set
    single = select_band(emb, timestep=600)  # the set a sampling step at t = 600 uses
"""
from ldm.modules.embedding_formats import EmbeddingFileError, Embeddings, band_edges


def band_at(edges, timestep):
    """The band a timestep falls in: how many edges are at or below it (the model's timestep_band)."""
    return sum(timestep >= e for e in edges)


def select_band(emb, band=None, timestep=None):
    """`emb` with only band `band`'s vectors (or those of the band `timestep` falls in), its band edges dropped;
    an embedding without bands is returned as it is (band 0 / any timestep), refused with another band."""
    if band is not None and timestep is not None:
        raise EmbeddingFileError("--band and --band_at both choose the set of vectors: give one of them")
    edges = band_edges(emb.fields.get("timestep_bands"))
    if timestep is not None:
        if timestep < 0:
            raise EmbeddingFileError(f"--band_at {timestep} is negative: give a diffusion timestep such as 500")
        band = band_at(edges, timestep)
    if band is None:
        return emb
    if not 0 <= band <= len(edges):
        bands = f"bands 0 to {len(edges)} (edges {list(edges)})" if edges else "one set of vectors (no bands)"
        raise EmbeddingFileError(f"--band {band} does not exist: these vectors hold {bands}")
    sets = len(edges) + 1
    vectors = {s: v.unflatten(0, (sets, -1))[band].clone() for s, v in emb.matrices().items()}
    fields = {k: v for k, v in emb.fields.items() if k != "timestep_bands"}
    return Embeddings(vectors, dict(emb.tokens), fields, emb.format)

