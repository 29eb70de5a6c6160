"""Damaged or malformed embedding files are refused in one line that names the file and the problem in words, never
loaded as other values; merge and convert refuse bad inputs and outputs with one `error:` line; loading is linear.

The fuzz test starts from valid files of every format written here, damages each many ways (seeded), and loads every
damaged file through read_embeddings and EmbeddingManager.load; it prints its counts (pytest -s shows them).
"""
import copy
import io
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from check import convert_embedding
from ldm.modules.embedding_formats import (
    HASH_KEY,
    MAX_FILE_BYTES,
    MAX_VECTORS,
    EmbeddingFileError,
    Embeddings,
    content_digest,
    read_embeddings,
    write_embeddings,
)
from ldm.modules.embedding_manager import EmbeddingManager

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261206
PLACEHOLDER = "<cat-toy>"
BYTE_MUTANTS_PER_SOURCE = 24
# Python's own words: a message holding one of these is a generic error that escaped, not a refusal in words
INTERNAL = ("ambiguous", "codec", "object has no attribute", "index out of range", "unhashable", "'NoneType'",
            "not supported between instances", "invalid literal", "Expecting value", "is not subscriptable",
            "object is not iterable", "deserializing", "PytorchStreamReader", "Unsupported operand",
            "Weights only load failed", "Traceback")
NAN = float("nan")


# ---- valid sources ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tiny_bert, tmp_path_factory):
    """{label: (path, injection)}: valid files of every format written here, each holding PLACEHOLDER, 2 vectors."""
    root = tmp_path_factory.mktemp("sources")
    made = {}
    for label, options in (("input", {}), ("banded", {"timestep_bands": [400]}), ("output", {"injection": "output"})):
        manager = EmbeddingManager(tiny_bert, [PLACEHOLDER], ["dog"], num_vectors_per_token=2, **options)
        with torch.no_grad():
            manager.string_to_param_dict[PLACEHOLDER].normal_(generator=torch.Generator().manual_seed(len(made)))
        for suffix in (".pt", ".safetensors"):
            made[f"original-{label}{suffix}"] = (root / f"original-{label}{suffix}", manager.injection)
            manager.save(made[f"original-{label}{suffix}"][0])
    for fmt, name in (("a1111", "a1111.pt"), ("a1111", "a1111.safetensors"), ("kohya", "kohya.safetensors"),
                      ("kohya", "kohya.pt"), ("diffusers", "diffusers.safetensors"), ("diffusers", "diffusers.bin"),
                      ("diffusers", "concept")):
        convert_embedding.convert(made["original-input.pt"][0], root / name, fmt)
        made[name] = (root / name, "input")
    return made


@pytest.fixture(scope="module")
def managers(tiny_bert):
    """One manager per injection point; each damaged file loads into the one of its source."""
    return {"input": EmbeddingManager(tiny_bert, ["*"]),
            "output": EmbeddingManager(tiny_bert, ["*"], ["dog"], injection="output")}


def weights_file(path):
    """The file holding the tensors: the path itself, or a diffusers concept folder's learned_embeds.safetensors."""
    return path / "learned_embeds.safetensors" if path.is_dir() else path


# ---- damage -------------------------------------------------------------------------------------------

def damaged_bytes(rng, blob):
    """One random damage at one place -> (kind, bytes): a burst of 1-4 changed bytes, a truncation, an insertion or
    a deletion of 1-16 bytes."""
    kind = rng.choice(("flip", "flip", "truncate", "insert", "delete"))
    data, at = bytearray(blob), rng.randrange(len(blob))
    if kind == "flip":
        for i in range(at, min(at + rng.randint(1, 4), len(data))):
            data[i] ^= rng.randint(1, 255)
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        del data[at:at + rng.randint(1, 16)]
    return kind, bytes(data)


BAD_VECTORS = ([1.0, 2.0], "text", {"a": 1}, 3, None, lambda: torch.zeros(2, 32, dtype=torch.bool),
               lambda: torch.ones(2, 32, dtype=torch.int64), lambda: torch.zeros(2, 32, dtype=torch.complex64),
               lambda: torch.tensor(1.0), lambda: torch.zeros(1, 2, 32), lambda: torch.zeros(0, 32),
               lambda: torch.full((2, 32), NAN), lambda: torch.zeros(2, 32).to_sparse())
BAD_IDS = ("1008", [1008], 1.5, True, None, -5, {"a": 1}, lambda: torch.tensor(1.5), lambda: torch.tensor([1008]),
           lambda: torch.tensor(True))
BAD_TABLES = ([1, 2], "text", 5, lambda: torch.zeros(3))
BAD_KEYS = (1, (1, 2), "", "a b", "tab\tkey", "new\nline", b"bytes")
BAD_BANDS = ("400", 400, [0], [500, 400], [True], [1.5], {"a": 1}, [-3], ["400"], [300, 700],
             lambda: torch.tensor([400]))
BAD_INJECTIONS = ("sideways", 5, ["output"], "", lambda: torch.tensor(1))
BAD_CONTEXTS = ("text", [5], {PLACEHOLDER: "x"}, {PLACEHOLDER: -3}, {1: 5}, {PLACEHOLDER: 1.5}, 7)
BAD_NAMES = (5, ["x"], "a b", "tab\t", lambda: torch.zeros(2))
BAD_STEPS = ("x", -1, 1.5, [1], lambda: torch.tensor(1.5))
BAD_TEXTS = (5, ["x"], lambda: torch.zeros(1))


def fresh(value):
    """Callables in the tables above make a new tensor each time."""
    return value() if callable(value) else value


def pt_slots(label):
    """[(where, bad values)] of a .pt source's dict: where is the tuple of keys leading to an entry."""
    if label.startswith("original"):
        slots = [(("string_to_param", PLACEHOLDER), BAD_VECTORS), (("string_to_token", PLACEHOLDER), BAD_IDS),
                 (("string_to_param",), BAD_TABLES), (("string_to_token",), BAD_TABLES),
                 (("timestep_bands",), BAD_BANDS), (("injection",), BAD_INJECTIONS)]
        return slots + ([(("context_token",), BAD_CONTEXTS)] if "output" in label else [])
    if label.startswith("a1111"):
        return [(("string_to_param", "*"), BAD_VECTORS), (("name",), BAD_NAMES), (("step",), BAD_STEPS),
                (("sd_checkpoint",), BAD_TEXTS), (("string_to_token",), BAD_TABLES),
                (("string_to_token", "*"), BAD_IDS + (-1,))]
    if label.startswith("kohya"):
        return [(("emb_params",), BAD_VECTORS)]
    return [((PLACEHOLDER,), BAD_VECTORS[5:])]  # diffusers .bin: one {token: tensor} entry; a non-tensor is no format


def with_value(data, where, value):
    """A copy of the nested dict `data` with the entry at `where` set to `value`."""
    data = dict(data)
    if len(where) == 1:
        data[where[0]] = value
    else:
        data[where[0]] = with_value(data[where[0]], where[1:], value)
    return data


def with_key(data, old, new):
    """A copy of `data` with the key `old` of every placeholder table (and of the top level) renamed to `new`."""
    renamed = {new if k == old else k: v for k, v in data.items()}
    return {k: with_key(v, old, new) if isinstance(v, dict) else v for k, v in renamed.items()}


def pt_mutants(label, blob, rng):
    """Malformed .pt files: the source's dict re-saved with a wrong value or key (each must be refused)."""
    data = torch.load(io.BytesIO(blob), weights_only=True)
    built = []
    for where, values in pt_slots(label):
        for value in map(fresh, rng.sample(values, min(3, len(values)))):
            built.append((f"{'.'.join(map(str, where))} = {value!r:.30}", with_value(data, where, value)))
    old = "*" if label.startswith("a1111") else PLACEHOLDER
    if not label.startswith("kohya"):
        built += [(f"key {key!r}", with_key(data, old, key)) for key in rng.sample(BAD_KEYS, 2)]
    built += [("whole file a list", [data]), ("whole file a tensor", torch.zeros(3))]
    return [(name, torch_bytes(value), True) for name, value in built]


def torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rezipped(blob, rename=lambda name: name, compression=zipfile.ZIP_STORED, extra=()):
    """A torch zip re-written entry by entry with new names, compression or extra entries."""
    source, out = zipfile.ZipFile(io.BytesIO(blob)), io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", compression) as target:
        warnings.simplefilter("ignore")  # a duplicate name is meant
        for info in source.infolist():
            target.writestr(rename(info.filename), source.read(info))
        for name, data in extra:
            target.writestr(name, data)
    return out.getvalue()


def zip_mutants(blob):
    """Torch zips with odd entries: (name, bytes, must be refused)."""
    folder = zipfile.ZipFile(io.BytesIO(blob)).namelist()[0].split("/")[0]
    return [("rezipped as is", rezipped(blob), False),
            ("extra odd entry", rezipped(blob, extra=[(f"{folder}/../odd name", b"x")]), False),
            ("data.pkl renamed", rezipped(blob, lambda n: n.replace("data.pkl", "data.pk")), True),
            ("one entry in another folder", rezipped(blob, lambda n: n.replace(f"{folder}/version", "other/version")),
             True),
            ("entries without a folder", rezipped(blob, lambda n: n.split("/", 1)[1]), True),
            ("data.pkl twice", rezipped(blob, extra=[(f"{folder}/data.pkl", b"\x80\x02N.")]), True),
            ("storage renamed", rezipped(blob, lambda n: n.replace("/data/0", "/data/9")), True),
            ("deflated", rezipped(blob, compression=zipfile.ZIP_DEFLATED), True)]


def safetensors_parts(blob):
    """({name: tensor}, header without the hash) of safetensors bytes."""
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        with safe_open(f.name, "pt") as st:
            header = dict(st.metadata() or {})
            header.pop(HASH_KEY, None)
            return {k: st.get_tensor(k) for k in st.keys()}, header


def resealed(tensors, header):
    """Safetensors bytes with a correct content hash, so that the reader's own checks meet the damage."""
    return safetensors_bytes(tensors, {**header, HASH_KEY: content_digest(tensors, header)})


BAD_TENSORS = (lambda: torch.zeros(2, 32, dtype=torch.bool), lambda: torch.ones(2, 32, dtype=torch.int64),
               lambda: torch.tensor(1.0), lambda: torch.zeros(1, 2, 32), lambda: torch.zeros(0, 32),
               lambda: torch.full((2, 32), NAN))
BAD_HEADER = {"injection": ("sideways", ""), "context_token": ("{", "[5]", '{"<cat-toy>": "x"}', '{"<cat-toy>": -3}',
                                                              "7"),
              "timestep_bands": ("[", '"400"', "[500, 400]", "[0]", "[true]", "{}", "400", "[1.5]"),
              "name": ("a b", "", "tab\t"), "step": ("x", "1.5", "-1", "[1]")}


def with_placeholder(tensors, name):
    """Safetensors tensors with the placeholder part of every 'group.<placeholder>' key replaced by `name`."""
    return {(f"{key.partition('.')[0]}.{name}" if "." in key else key): value for key, value in tensors.items()}


def safetensors_mutants(label, blob, rng):
    """Malformed safetensors files, hash recomputed: wrong tensors, keys and header entries (each must be refused)."""
    tensors, header = safetensors_parts(blob)
    built = []
    for key in tensors:
        bad = rng.sample(BAD_TENSORS, 3) + ([lambda: torch.tensor(1.5), lambda: torch.tensor([1])]
                                            if key.startswith("string_to_token") else [])
        built += [(f"{key} = {value()!r:.30}", resealed({**tensors, key: value()}, header)) for value in bad]
    groups = {key.partition(".")[0] for key in tensors if "." in key}
    built += [(f"placeholder {name!r}", resealed(with_placeholder(tensors, name), header))
              for name in ("", "a b", "tab\t") if groups]
    built += [(f"a bare {group} tensor", resealed({**tensors, group: torch.zeros(2)}, header)) for group in groups]
    keys = [k for k in BAD_HEADER if k in header or label.startswith("original") and k in ("injection",
                                                                                          "timestep_bands")]
    keys += ["context_token"] if "output" in label else []
    for key in keys:
        built += [(f"header {key} = {value!r}", resealed(tensors, {**header, key: value})) for value in BAD_HEADER[key]]
    return [(name, data, True) for name, data in built]


def header_mutants(blob):
    """Safetensors headers damaged as a whole: huge, not UTF-8, not JSON, not an object."""
    length = int.from_bytes(blob[:8], "little")
    return [("huge header length", (2 ** 40).to_bytes(8, "little") + blob[8:], True),
            ("header not UTF-8", blob[:9] + b"\xff" + blob[10:], True),
            ("header not JSON", blob[:8] + b"[" + blob[9:], True),
            ("header a JSON list", blob[:8] + b"[1]".ljust(length) + blob[8 + length:], True)]


def mutants(sources):
    """[(source label, mutant name, bytes, must be refused)], the same list on every run."""
    rng = random.Random(SEED)
    made = []
    for label, (path, _) in sorted(sources.items()):
        blob = weights_file(path).read_bytes()
        for _ in range(BYTE_MUTANTS_PER_SOURCE):
            kind, data = damaged_bytes(rng, blob)
            made.append((label, kind, data, False))
        if blob[:2] == b"PK":
            structural = pt_mutants(label, blob, rng) + zip_mutants(blob)
        else:
            structural = safetensors_mutants(label, blob, rng) + header_mutants(blob)
        made += [(label, name, data, refuse) for name, data, refuse in structural]
    return made


# ---- the fuzz test ------------------------------------------------------------------------------------

def write_mutant(folder, source, data):
    """Write a damaged file in place of the source's weights -> the path to load (a concept folder stays one)."""
    folder.mkdir()
    if source.is_dir():
        shutil.copytree(source, folder / source.name)
        (folder / source.name / "learned_embeds.safetensors").write_bytes(data)
        return folder / source.name
    (folder / source.name).write_bytes(data)
    return folder / source.name


def outcome(load, path):
    """-> ('loaded', result) or ('refused', message); any other exception fails the test."""
    try:
        return "loaded", load()
    except (EmbeddingFileError, FileNotFoundError) as e:
        message = str(e)
        assert str(path) in message, message
        assert "\n" not in message and not [p for p in INTERNAL if p in message], message
        return "refused", message


def same_embeddings(a, b):
    return (a.format == b.format and a.tokens == b.tokens and a.fields == b.fields
            and a.vectors.keys() == b.vectors.keys()
            and all(a.vectors[s].dtype == b.vectors[s].dtype and torch.equal(a.vectors[s], b.vectors[s])
                    for s in a.vectors))


def manager_state(manager):
    return ({s: p.detach().clone() for s, p in manager.string_to_param_dict.items()}, manager.timestep_bands,
            dict(manager.context_ids) if manager.injection == "output" else None)


def same_state(a, b):
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][s], b[0][s]) for s in a[0]) and a[1:] == b[1:])


def test_damaged_files_are_refused_in_words_or_load_unchanged(sources, managers, tmp_path):
    expected = {}
    for label, (path, injection) in sources.items():
        managers[injection].load(path, name=PLACEHOLDER)
        expected[label] = read_embeddings(path, name=PLACEHOLDER), manager_state(managers[injection])
    counts = {"files": 0, "refused": 0, "loaded identical": 0}
    for i, (label, name, data, must_refuse) in enumerate(mutants(sources)):
        source, injection = sources[label]
        path = write_mutant(tmp_path / f"m{i}", source, data)
        read = outcome(lambda: read_embeddings(path, name=PLACEHOLDER), path)
        manager = managers[injection]
        loaded = outcome(lambda: manager.load(path, name=PLACEHOLDER), path)
        context = f"{label}: {name}: read {read[0]}, manager {loaded[0]}: {read[1] if read[0] == 'refused' else ''}"
        assert read[0] == loaded[0], context
        if read[0] == "loaded":
            assert not must_refuse and same_embeddings(read[1], expected[label][0]), context
            assert same_state(manager_state(manager), expected[label][1]), context
        counts["files"] += 1
        counts["refused" if read[0] == "refused" else "loaded identical"] += 1
    print(f"\nfuzz: {counts['files']} damaged files from {len(sources)} sources: {counts['refused']} refused, "
          f"{counts['loaded identical']} loaded identical, 0 generic errors")
    assert counts["files"] >= 300 and counts["refused"] > counts["files"] // 2


# ---- single malformed files, named in words ----------------------------------------------------------

def original(value=None, **entries):
    """An original-format dict with one placeholder, entries replaced."""
    data = {"string_to_token": {PLACEHOLDER: torch.tensor(-1)}, "string_to_param": {PLACEHOLDER: torch.zeros(2, 32)}}
    return {**data, **entries}


COUNTING = torch.arange(64.0).reshape(2, 32)  # vectors whose bytes are easy to find in a file


def with_changed_vector(path):
    """Change one byte of COUNTING's bytes inside the file at `path`, as damage on a disk would."""
    data = bytearray(path.read_bytes())
    data[data.find(COUNTING.numpy().tobytes()) + 17] ^= 0x40
    path.write_bytes(bytes(data))


def sparse_file(path, size):
    """A file of `size` bytes, starting as a zip does, that takes no room on the disk (all but 2 bytes a hole)."""
    path.write_bytes(b"PK")
    os.truncate(path, size)


def save_safetensors(path, tensors, header):
    path.write_bytes(safetensors_bytes(tensors, header))


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.save({1: torch.zeros(2, 32)}, p), "named by 1, not a string"),
    (lambda p: torch.save(original(string_to_param={(1, 2): torch.zeros(2, 32)}), p), "named by a value of type tuple"),
    (lambda p: torch.save(original(string_to_token=torch.zeros(2)), p), "'string_to_token' is a tensor of shape"),
    (lambda p: torch.save(original(string_to_param=[torch.zeros(2, 32)]), p),
     "'string_to_param' is a value of type list"),
    (lambda p: torch.save(original(string_to_param={PLACEHOLDER: "text"}), p), "are the text 'text', not a tensor"),
    (lambda p: torch.save(original(string_to_param={PLACEHOLDER: {"a": 1}}), p), "are a value of type dict"),
    (lambda p: torch.save(original(string_to_param={PLACEHOLDER: torch.zeros(2, 32, dtype=torch.bool)}), p),
     "dtype torch.bool; expected floating point"),
    (lambda p: torch.save(original(string_to_param={PLACEHOLDER: torch.zeros(2, 32, dtype=torch.complex64)}), p),
     "dtype torch.complex64"),
    (lambda p: torch.save(original(string_to_param={PLACEHOLDER: torch.tensor(1.0)}), p), r"have shape \(\)"),
    (lambda p: torch.save({"string_to_token": {"": torch.tensor(1)}, "string_to_param": {"": torch.zeros(1, 32)}}, p),
     "placeholder '' is not one word"),
    (lambda p: torch.save({"a b": torch.zeros(1, 32)}, p), "placeholder 'a b' is not one word"),
    (lambda p: torch.save(original(string_to_token={PLACEHOLDER: torch.tensor([1, 2])}), p),
     "the token id of '<cat-toy>' is a tensor of shape \\(2,\\)"),
    (lambda p: torch.save(original(string_to_token={PLACEHOLDER: torch.tensor(1.5)}), p), "expected a whole number"),
    (lambda p: torch.save(original(timestep_bands="400"), p), "'timestep_bands' is the text '400'"),
    (lambda p: torch.save(original(timestep_bands=[500, 400]), p), "must be increasing positive timesteps"),
    (lambda p: torch.save(original(timestep_bands=[100, 200]), p), "not a multiple of its 3 timestep bands"),
    (lambda p: torch.save(original(injection="sideways"), p), "'injection' is the text 'sideways'; expected one of"),
    (lambda p: torch.save(original(injection="output", context_token=[5]), p),
     "'context_token' is a value of type list"),
    (lambda p: save_safetensors(p, {f"string_to_token.{PLACEHOLDER}": torch.tensor(-1),
                                    f"string_to_param.{PLACEHOLDER}": torch.zeros(2, 32)},
                                {"injection": "output", "context_token": "{1: 2}"}),
     "the header entry 'context_token' is not valid JSON"),
    (lambda p: save_safetensors(p, {f"string_to_token.{PLACEHOLDER}": torch.tensor(-1),
                                    f"string_to_param.{PLACEHOLDER}": torch.zeros(2, 32)}, {"timestep_bands": "[4"}),
     "the header entry 'timestep_bands' is not valid JSON"),
    (lambda p: save_safetensors(p, {"string_to_param.*": torch.zeros(1, 32)}, {"name": "x", "step": "many"}),
     "the header entry 'step' is not valid JSON"),
    (lambda p: p.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}"), "header claims 1000000000000 bytes but 2"),
    (lambda p: p.write_bytes((3).to_bytes(8, "little") + b"{\xff}"), "header is not UTF-8 text"),
    (lambda p: p.write_bytes((3).to_bytes(8, "little") + b"{1}"), "header is not valid JSON"),
    (lambda p: torch.save({"<x>": torch.zeros(MAX_VECTORS + 1, 1)}, p), f"more than the {MAX_VECTORS} an embedding"),
    (lambda p: sparse_file(p, MAX_FILE_BYTES + 1), "takes 268,435,457 bytes, more than the 256 MiB an embedding"),
    (lambda p: p.write_bytes(torch_bytes(original())[:-30]), "zip structure .* is damaged or truncated"),
    (lambda p: (torch.save(original(string_to_param={PLACEHOLDER: COUNTING}), p), with_changed_vector(p)),
     r"entry '.*/data/\d' fails its CRC-32 check: the file was changed"),
    (lambda p: p.write_bytes(rezipped(torch_bytes(original()), lambda n: n.split("/", 1)[1])),
     "a zip archive but not a torch file"),
])
def test_malformed_files_are_named_in_words(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(EmbeddingFileError, match=message) as info:
        read_embeddings(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_safetensors_file_changed_after_saving_is_refused(tmp_path):
    write_embeddings(Embeddings({PLACEHOLDER: COUNTING}), tmp_path / "e.safetensors")
    with_changed_vector(tmp_path / "e.safetensors")
    with pytest.raises(EmbeddingFileError, match="the file was changed after it was saved"):
        read_embeddings(tmp_path / "e.safetensors")


def test_the_pt_file_stays_the_reference_layout(tmp_path):
    """The .pt dict holds exactly the reference's keys (its CRCs protect it); safetensors headers hold the hash."""
    write_embeddings(Embeddings({PLACEHOLDER: torch.zeros(2, 32)}), tmp_path / "e.pt")
    assert set(torch.load(tmp_path / "e.pt", weights_only=True)) == {"string_to_token", "string_to_param"}


@pytest.mark.parametrize("contexts, message", [({PLACEHOLDER: 10 ** 6}, "looks up token 1000000"),
                                               ({PLACEHOLDER: 3}, None)])
def test_a_context_token_past_the_encoder_is_refused_on_load(managers, tmp_path, contexts, message):
    emb = Embeddings({PLACEHOLDER: torch.zeros(2, 32)}, {}, {"injection": "output", "context_token": contexts})
    write_embeddings(emb, tmp_path / "e.pt")
    if message is None:
        managers["output"].load(tmp_path / "e.pt")
        assert managers["output"].context_ids == contexts
        return
    with pytest.raises(EmbeddingFileError, match=message):
        managers["output"].load(tmp_path / "e.pt")


# ---- loading is linear --------------------------------------------------------------------------------

class Calls:
    """Counts calls of the encoder methods the manager registers and looks up tokens through."""

    NAMES = ("add_placeholder_tokens", "word_token_ids", "placeholder_token_id")

    def __init__(self, encoder, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            monkeypatch.setattr(encoder, name, self.counting(getattr(encoder, name)))

    def counting(self, method):
        def call(*args):
            self.count += 1
            return method(*args)
        return call


def test_a_placeholder_longer_than_the_context_is_refused_before_any_token_work(make_encoder, tmp_path, monkeypatch):
    bert = make_encoder("bert")
    write_embeddings(Embeddings({"<long>": torch.zeros(2000, 32)}), tmp_path / "long.safetensors")
    manager = EmbeddingManager(bert, ["*"])
    calls = Calls(bert, monkeypatch)
    with pytest.raises(EmbeddingFileError, match="2000 vectors for '<long>' but a prompt of this text encoder "
                                                 r"\(BERTEmbedder\) holds 75 tokens"):
        manager.load(tmp_path / "long.safetensors")
    assert calls.count == 0 and list(manager.string_to_param_dict) == ["*"]


def traced_lines(fn):
    """Lines of this repository's ldm package that fn() executes: a count of the manager's own work, whatever the
    machine's speed (the tokenizer library's work is counted by Calls instead)."""
    package, count = str(ROOT / "ldm"), 0

    def trace(frame, event, arg):
        nonlocal count
        if not frame.f_code.co_filename.startswith(package):
            return None
        count += 1
        return trace

    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("vectors_each", [1, 4])
def test_loading_work_grows_linearly_with_the_file(make_encoder, tmp_path, monkeypatch, vectors_each):
    """Twice the placeholders: twice the encoder calls besides the one registration of all new tokens, one call of
    the tokenizer library's add_tokens (it rebuilds its matcher at each: one per token made 4,000 tokens take 14 s),
    and about twice the lines run (2.0x; checking each placeholder against every other, as loading once did, gave
    2.4x and more at these sizes)."""
    work = []
    for count in (150, 300):
        bert = make_encoder("bert")
        path = tmp_path / f"{count}.safetensors"
        write_embeddings(Embeddings({f"<p{count}-{i}>": torch.zeros(vectors_each, 32) for i in range(count)}), path)
        manager, calls = EmbeddingManager(bert, ["*"]), Calls(bert, monkeypatch)
        tokenizer = bert.tokenizer.tokenizer = copy.deepcopy(bert.tokenizer.tokenizer)  # the copy the manager edits
        bert.tokenizer._owns_tokenizer, added = True, []
        add = tokenizer.add_tokens
        monkeypatch.setattr(tokenizer, "add_tokens", lambda tokens: added.append(1) or add(tokens))
        work.append((traced_lines(lambda: manager.load(path)), calls.count))
        assert len(manager.string_to_param_dict) == count and added == [1]
    (small_lines, small_calls), (large_lines, large_calls) = work
    assert large_calls - 1 == 2 * (small_calls - 1)
    assert large_lines < 2.2 * small_lines, work


# ---- the commands -------------------------------------------------------------------------------------

def run_tool(*args):
    """A command as a user runs it -> CompletedProcess (text)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def writable(folder):
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write to: a mode 0555 folder, or, where root ignores modes, /sys (sysfs refuses
    new files for everyone)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    usable = [f for f in (folder, Path("/sys")) if f.is_dir() and not writable(f)]
    yield usable[0] if usable else pytest.skip("no folder here refuses this process's writes")
    folder.chmod(0o755)


@pytest.fixture
def files(tmp_path):
    """Two valid inputs, a concept folder, a damaged file and an existing output, as paths."""
    write_embeddings(Embeddings({"<a>": torch.zeros(1, 32)}), tmp_path / "a.pt")
    write_embeddings(Embeddings({"<b>": torch.ones(1, 32)}), tmp_path / "b.safetensors")
    write_embeddings(Embeddings({"<c>": torch.ones(1, 32)}), tmp_path / "concept", "diffusers")
    (tmp_path / "damaged.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:-40])
    (tmp_path / "existing.pt").write_bytes(b"the user's own file")
    return tmp_path


MERGE = ("merge_embeddings.py", "--manager_ckpts")
CONVERT = ("check/convert_embedding.py",)


@pytest.mark.parametrize("command, message", [
    (MERGE + ("{d}/a.pt", "{d}/b.safetensors", "--output_path", "{d}/b.safetensors"),
     "output .*b.safetensors is the input"),
    (MERGE + ("{d}/a.pt", "{d}/b.safetensors", "--output_path", "{d}/existing.pt"),
     "existing.pt already exists: pass --overwrite"),
    (MERGE + ("{d}/a.pt", "{d}/b.safetensors", "--output_path", "{ro}/m.pt"), "cannot write .*m.pt: permission denied"),
    (MERGE + ("{d}/a.pt", "{d}/missing.pt", "--output_path", "{d}/m.pt"), "embedding file not found: .*missing.pt"),
    (MERGE + ("{d}/a.pt", "{d}/damaged.pt", "--output_path", "{d}/m.pt"), "damaged.pt: its zip structure"),
    (CONVERT + ("{d}/a.pt", "{d}/a.pt", "--to", "original"), "output .*a.pt is the input"),
    (CONVERT + ("{d}/concept/learned_embeds.safetensors", "{d}/concept", "--to", "diffusers"),
     "is the input .*concept"),
    (CONVERT + ("{d}/concept", "{d}/concept/learned_embeds.safetensors", "--to", "diffusers"),
     "is the input .*concept"),
    (CONVERT + ("{d}/a.pt", "{d}/existing.pt", "--to", "a1111"), "existing.pt already exists: pass --overwrite"),
    (CONVERT + ("{d}/a.pt", "{ro}/a.safetensors", "--to", "kohya"), "cannot write .*a.safetensors: permission denied"),
    (CONVERT + ("{d}/missing.pt", "{d}/m.pt", "--to", "original"), "embedding file not found"),
    (CONVERT + ("{d}/damaged.pt", "{d}/m.pt", "--to", "original"), "damaged.pt: its zip structure"),
])
def test_commands_refuse_in_one_line(files, read_only_folder, command, message):
    """Exit status 2, one `error:` line naming the problem, no traceback, and no file written or replaced."""
    before = {p: p.read_bytes() for p in files.rglob("*") if p.is_file()}
    script, *args = command
    done = run_tool(ROOT / script, *(a.format(d=files, ro=read_only_folder) for a in args))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr and re.search(message, lines[0]), lines[0]
    assert {p: p.read_bytes() for p in files.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_an_existing_output(files):
    done = run_tool(ROOT / "merge_embeddings.py", "--manager_ckpts", files / "a.pt", files / "b.safetensors",
                    "--output_path", files / "existing.pt", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert list(read_embeddings(files / "existing.pt").vectors) == ["<a>", "<b>"]


def test_debug_shows_the_traceback(files):
    done = run_tool(ROOT / "check/convert_embedding.py", files / "missing.pt", files / "m.pt", "--to", "original",
                    "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr


def test_convert_into_a_read_only_folder_in_process(files, read_only_folder, capsys):
    """The OSError from the temporary file beside the output names the output, not the temporary file."""
    with pytest.raises(SystemExit) as exit_:
        convert_embedding.main([str(files / "a.pt"), str(read_only_folder / "x.pt"), "--to", "original"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and f"cannot write {read_only_folder / 'x.pt'}:" in err[0]
