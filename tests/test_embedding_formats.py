"""Embedding files: four formats round-trip through every encoder and injection point; bad files fail in one line."""
import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import merge_embeddings
from check import convert_embedding
from ldm.merge import merge
from ldm.modules.embedding_formats import HASH_KEY, Embeddings, read_embeddings, write_embeddings
from ldm.modules.embedding_manager import EmbeddingManager

ENCODERS = ["bert", "clip", "t5"]
INJECTIONS = ["input", "output"]
TARGETS = [("original", "e.pt"), ("original", "e.safetensors"), ("diffusers", "concept"),
           ("diffusers", "e.safetensors"), ("diffusers", "e.bin"), ("a1111", "e.pt"), ("a1111", "e.safetensors"),
           ("kohya", "e.safetensors"), ("kohya", "e.pt")]


@pytest.fixture(scope="module")
def encoders(make_encoder):
    return {kind: make_encoder(kind) for kind in ENCODERS}


def vectors(n, width=32, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def one_line_error(fn, match, error=ValueError):
    with pytest.raises(error, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt, name", [("original", "e.pt"), ("diffusers", "concept"), ("a1111", "e.safetensors"),
                                       ("kohya", "e.safetensors")])
@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("kind", ENCODERS)
def test_manager_round_trip(encoders, tmp_path, kind, injection, fmt, name):
    encoder = encoders[kind]
    trained = EmbeddingManager(encoder, ["<cat-toy>"], ["dog"], num_vectors_per_token=2, injection=injection)
    with torch.no_grad():
        trained.string_to_param_dict["<cat-toy>"].copy_(vectors(2))
    trained.save(tmp_path / "trained.pt")
    dst = tmp_path / name
    convert = lambda: convert_embedding.convert(tmp_path / "trained.pt", dst, fmt, name="<cat-toy>")  # noqa: E731
    if injection == "output" and fmt != "original":
        one_line_error(convert, "replace the encoder's final states .* keep the original format")
        assert not dst.exists()
        return
    convert()
    loaded = EmbeddingManager(encoder, ["*"], injection=injection)
    loaded.load(dst, name="<cat-toy>")  # kohya files carry no name
    assert loaded.placeholder_ids == trained.placeholder_ids
    if injection == "output":  # the looked-up context token matters only there, and output files record it
        assert loaded.context_ids == trained.context_ids
    with torch.no_grad():
        got, want = (encoder.encode(["a photo of <cat-toy>"], embedding_manager=m) for m in (loaded, trained))
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt, name", TARGETS)
def test_load_save_gives_the_same_bytes(tmp_path, fmt, name):
    emb = Embeddings({"<cat-toy>": vectors(2)}, {"<cat-toy>": 49408}, {})
    write_embeddings(emb, tmp_path / "a" / name, fmt)
    again = read_embeddings(tmp_path / "a" / name, name="<cat-toy>")  # kohya files carry no name
    assert again.format == fmt and list(again.vectors) == ["<cat-toy>"]
    write_embeddings(again, tmp_path / "b" / name, fmt)
    assert files_under(tmp_path / "a") == files_under(tmp_path / "b")
    for rel in files_under(tmp_path / "a"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def reference_file(path, param):
    """As the reference saves: a pickled nn.ParameterDict, through a path."""
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": nn.ParameterDict({"*": param})}, path)


def a1111_file(path, param):
    """As AUTOMATIC1111's Embedding.save writes: string_to_token {'*': 265}, a tensor that requires grad."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": param.clone().requires_grad_()},
                "name": "cat-toy", "step": 1500, "sd_checkpoint": "4bdfc29c", "sd_checkpoint_name": "v1-5"}, path)


def safetensors_content(path):
    """({name: tensor}, header) of a safetensors file, the header without the content hash this framework adds."""
    with safe_open(path, "pt") as f:
        header = dict(f.metadata() or {})
        header.pop(HASH_KEY, None)
        return {k: f.get_tensor(k) for k in f.keys()}, header


@pytest.mark.parametrize("writer, fmt, name", [
    (reference_file, "original", "ref.pt"),
    (a1111_file, "a1111", "a1111.pt"),
    (lambda p, v: save_file({"<cat-toy>": v}, p, metadata={"format": "pt"}), "diffusers", "learned.safetensors"),
    (lambda p, v: torch.save({"<cat-toy>": v}, p), "diffusers", "learned.bin"),
    (lambda p, v: save_file({"emb_params": v}, p), "kohya", "kohya.safetensors"),
])
def test_files_of_other_tools_round_trip(tmp_path, writer, fmt, name):
    """Vectors and fields come back; a safetensors file keeps its tensors and header and gains the content hash."""
    original = tmp_path / name
    writer(original, vectors(3))
    emb = read_embeddings(original)
    assert emb.format == fmt and torch.equal(next(iter(emb.matrices().values())), vectors(3))
    write_embeddings(emb, tmp_path / "out" / name, fmt)
    again = read_embeddings(tmp_path / "out" / name)
    assert again.vectors.keys() == emb.vectors.keys() and again.fields == emb.fields
    assert all(torch.equal(again.vectors[s], emb.vectors[s]) for s in emb.vectors)
    if name.endswith(".safetensors"):
        (written, header), (source, source_header) = (safetensors_content(p) for p in (tmp_path / "out" / name,
                                                                                        original))
        assert header == source_header and written.keys() == source.keys()
        assert all(torch.equal(written[k], source[k]) and written[k].dtype == source[k].dtype for k in source)
        with safe_open(tmp_path / "out" / name, "pt") as f:
            assert HASH_KEY in f.metadata()


def test_a1111_fields_survive(tmp_path):
    a1111_file(tmp_path / "x.pt", vectors(1))
    emb = read_embeddings(tmp_path / "x.pt")
    assert list(emb.vectors) == ["cat-toy"]
    assert emb.fields == {"step": 1500, "sd_checkpoint": "4bdfc29c", "sd_checkpoint_name": "v1-5",
                          "string_to_token": {"*": 265}}


def test_kohya_takes_its_name_from_the_file_or_name(tmp_path):
    save_file({"emb_params": vectors(2)}, tmp_path / "my-style.safetensors")
    assert list(read_embeddings(tmp_path / "my-style.safetensors").vectors) == ["my-style"]
    assert list(read_embeddings(tmp_path / "my-style.safetensors", name="<s>").vectors) == ["<s>"]


class Executes:
    """Pickles as a call of Path.touch: loading must refuse it, not run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(b"not an embedding at all"), "neither a torch file nor a safetensors file"),
    (lambda p: torch.save({"weights": vectors(1), "bias": vectors(1)}, p), "is not a textual-inversion embedding"),
    (lambda p: torch.save([vectors(1)], p), "is not a textual-inversion embedding"),
    (lambda p: torch.save({"<x>": torch.zeros(1, 2, 32)}, p), r"'<x>' have shape \(1, 2, 32\); expected \(n, D\)"),
    (lambda p: torch.save({"<x>": torch.zeros(0, 32)}, p), r"have shape \(0, 32\)"),
    (lambda p: torch.save({"<x>": torch.zeros(2, 32, dtype=torch.int64)}, p), "dtype torch.int64"),
    (lambda p: torch.save({"<x>": torch.tensor([[0.0, float("nan")]])}, p), "contain NaN or inf"),
    (lambda p: save_file({"emb_params": torch.tensor([[float("inf"), 1.0]])}, p), "contain NaN or inf"),
    (lambda p: torch.save({"string_to_token": {"*": 1}, "string_to_param": {"@": vectors(1)}}, p), "is damaged"),
])
def test_bad_files_are_one_clear_line(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    one_line_error(lambda: read_embeddings(path), message)


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"string_to_param": {"*": vectors(1)}, "name": "x", "extra": Executes(marker)}, tmp_path / "evil.pt")
    one_line_error(lambda: read_embeddings(tmp_path / "evil.pt"), "pickles objects other than tensors")
    assert not marker.exists()


def test_a_file_for_another_width_names_both(encoders, tmp_path):
    save_file({"<x>": vectors(1, width=768)}, tmp_path / "sd.safetensors")
    manager = EmbeddingManager(encoders["clip"], ["*"])
    one_line_error(lambda: manager.load(tmp_path / "sd.safetensors"),
                   r"width 768 but this model's text encoder uses 32 \(FrozenCLIPEmbedder\)")


def test_a_file_for_another_encoder_names_both(encoders, tmp_path):
    EmbeddingManager(encoders["bert"], ["*"], ["dog"]).save(tmp_path / "bert.pt")  # '*' is 1008 for BERT
    manager = EmbeddingManager(encoders["clip"], ["*"])
    one_line_error(lambda: manager.load(tmp_path / "bert.pt"),
                   r"maps placeholder '\*' to token 1008 but .* \(FrozenCLIPEmbedder\) gives 265")


def test_a_file_for_the_other_injection_point_names_both(encoders, tmp_path):
    EmbeddingManager(encoders["t5"], ["<a>"], ["dog"], injection="output").save(tmp_path / "out.safetensors")
    assert read_embeddings(tmp_path / "out.safetensors").injection == "output"
    manager = EmbeddingManager(encoders["t5"], ["<a>"], ["dog"])
    one_line_error(lambda: manager.load(tmp_path / "out.safetensors"),
                   "holds vectors for injection 'output' but this manager injects at the 'input'")


def test_a_placeholder_that_is_a_vocabulary_word_needs_the_flag_on_load(encoders, tmp_path):
    save_file({"dog": vectors(1)}, tmp_path / "dog.safetensors")
    one_line_error(lambda: EmbeddingManager(encoders["bert"], ["*"]).load(tmp_path / "dog.safetensors"),
                   "placeholder 'dog' is already the vocabulary token")


@pytest.mark.parametrize("emb, fmt, message", [
    (Embeddings({"<a>": vectors(1), "<b>": vectors(1)}), "diffusers", "holds one placeholder but these .* hold 2"),
    (Embeddings({"<a>": vectors(1)}, fields={"injection": "output", "context_token": {"<a>": 0}}), "kohya",
     "injection: output"),
    (Embeddings({"<a>": vectors(1)}), "pickle", "unknown embedding format 'pickle'"),
])
def test_refused_writes_leave_nothing_behind(tmp_path, emb, fmt, message):
    one_line_error(lambda: write_embeddings(emb, tmp_path / "out" / "e.safetensors", fmt), message)
    assert not (tmp_path / "out").exists()


def test_convert_cli(tmp_path, capsys):
    save_file({"emb_params": vectors(2)}, tmp_path / "k.safetensors")
    assert convert_embedding.main([str(tmp_path / "k.safetensors"), str(tmp_path / "toy"), "--to", "diffusers",
                                   "--name", "<toy>", "--type_of_concept", "style"]) == 0
    assert "(kohya) -> " in capsys.readouterr().out
    assert (tmp_path / "toy" / "token_identifier.txt").read_text() == "<toy>"
    assert (tmp_path / "toy" / "type_of_concept.txt").read_text() == "style"
    with pytest.raises(SystemExit) as exit_:
        convert_embedding.main([str(tmp_path / "toy"), str(tmp_path / "bad.txt"), "--to", "a1111"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "name it .pt or .safetensors" in err[0]
    assert not (tmp_path / "bad.txt").exists()


def write_original(path, placeholders, width=32, injection="input"):
    fields = {} if injection == "input" else {"injection": "output", "context_token": {s: 0 for s in placeholders}}
    emb = Embeddings({s: vectors(1, width, seed=i) for i, s in enumerate(placeholders)},
                     {s: 1008 for s in placeholders}, fields)
    write_embeddings(emb, path, "original")
    return path


def test_merge_renames_clashes(encoders, tmp_path, capsys):
    a, b = write_original(tmp_path / "a.pt", ["*", "<x>"]), write_original(tmp_path / "b.pt", ["*"])
    save_file({"emb_params": vectors(2, seed=9)}, tmp_path / "my-style.safetensors")
    out = tmp_path / "ab.pt"
    assert merge_embeddings.main(["--manager_ckpts", str(a), str(b), str(tmp_path / "my-style.safetensors"),
                                  "--output_path", str(out), "--rename", "*=<b-star>"]) == 0
    merged = read_embeddings(out)
    assert list(merged.vectors) == ["*", "<x>", "<b-star>", "my-style"]
    assert merged.tokens == {"*": 1008, "<x>": 1008, "<b-star>": -1, "my-style": -1}  # -1: no token recorded
    assert torch.equal(merged.vectors["<b-star>"], vectors(1, seed=0))
    manager = EmbeddingManager(encoders["bert"], ["*"])
    manager.load(out)
    assert list(manager.string_to_param_dict) == ["*", "<x>", "<b-star>", "my-style"]


@pytest.mark.parametrize("second, extra, message", [
    (["*"], [], r"placeholder '\*' is in both .*a.pt and .*b.pt: rename one with --rename '\*=NEW'"),
    (["<y>"], ["--rename", "*=<z>"], r"--rename \*=<z> matched no clashing placeholder"),
    (["*"], ["--rename", "*=<x>"], "'<x>' is already used"),
    (["*"], ["--rename", "star"], "is not OLD=NEW"),
])
def test_merge_refusals_are_one_line_and_write_nothing(tmp_path, capsys, second, extra, message):
    a, b = write_original(tmp_path / "a.pt", ["*", "<x>"]), write_original(tmp_path / "b.pt", second)
    with pytest.raises(SystemExit) as exit_:
        merge_embeddings.main(["--manager_ckpts", str(a), str(b), "--output_path", str(tmp_path / "m.pt"), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert pytest.importorskip("re").search(message, err[0]), err[0]
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("width, injection, message", [(768, "input", "width 32 but .* has width 768"),
                                                        (32, "output", "injection 'input' vectors but")])
def test_merge_needs_one_encoder_and_injection(tmp_path, width, injection, message):
    a = write_original(tmp_path / "a.pt", ["<a>"])
    b = write_original(tmp_path / "b.pt", ["<b>"], width, injection)
    one_line_error(lambda: merge([a, b]), message)


def test_safetensors_original_keeps_output_fields(tmp_path):
    emb = Embeddings({"<a>": vectors(1)}, {"<a>": 30522}, {"injection": "output", "context_token": {"<a>": 3899}})
    write_embeddings(emb, tmp_path / "o.safetensors")
    with safe_open(tmp_path / "o.safetensors", "pt") as f:
        assert json.loads(f.metadata()["context_token"]) == {"<a>": 3899}
    assert read_embeddings(tmp_path / "o.safetensors").fields == emb.fields
