"""Textual-inversion embedding files: four formats, each one reader/writer pair, detected on load.

| format    | files                          | layout                                                             |
| --------- | ------------------------------ | ------------------------------------------------------------------ |
| original  | .pt, .safetensors              | {"string_to_token": {s: () int64},                                 |
|           |                                | "string_to_param": {s: (n, D)}}; safetensors keys                  |
|           |                                | "string_to_token.<s>", "string_to_param.<s>"; output-injection     |
|           |                                | files add "injection" and "context_token", timestep-banded ones    |
|           |                                | "timestep_bands" (safetensors: in the header)                      |
| diffusers | folder, .safetensors, .bin     | {token: (n, D) or (D,)}; a folder holds learned_embeds.safetensors |
|           |                                | (or .bin), token_identifier.txt, type_of_concept.txt               |
| a1111     | .pt, .safetensors              | {"string_to_token": {"*": 265}, "string_to_param": {"*": (n, D)},  |
|           |                                | "name", "step", "sd_checkpoint", "sd_checkpoint_name"};            |
|           |                                | safetensors: "string_to_param.*", the other fields in the header   |
| kohya     | .safetensors, .pt              | {"emb_params": (n, D)}; the placeholder is the file's stem         |
|           |                                | (or a given name)                                                  |

Token ids recorded in original files are those of the writer's tokenizer; -1 where the writer had
none (converted or merged files). Reading never runs pickled code (safetensors, or torch.load with
weights_only). Writing serialises everything in memory first, then writes each file atomically.

Integrity: torch.load checks no checksum, so a zip-format torch file is checked against the CRC-32s of its
entries before it is unpickled; every safetensors file written here records a sha256 of its tensors and header
under the header key "content_sha256", checked on reading (files of other tools have none). The .pt layouts stay
exactly those of the reference and the other tools. A file that does not read as an embedding, in any part, is
refused with one EmbeddingFileError line naming it; so is one over MAX_FILE_BYTES or MAX_VECTORS.
"""
import hashlib
import io
import json
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ldm.modules.placeholders import INJECTIONS
from ldm.util import atomic_path

FORMATS = ("original", "diffusers", "a1111", "kohya")
DIFFUSERS_WEIGHTS = ("learned_embeds.safetensors", "learned_embeds.bin")
CONCEPT_FILES = (*DIFFUSERS_WEIGHTS, "token_identifier.txt", "type_of_concept.txt")  # what a concept folder holds
NESTED = ("string_to_token", "string_to_param")  # original safetensors keys "<group>.<placeholder>"
A1111_FIELDS = ("step", "sd_checkpoint", "sd_checkpoint_name")
A1111_STAR = {"*": 265}  # what AUTOMATIC1111 writes as string_to_token (CLIP's id of '*')
HASH_KEY = "content_sha256"  # safetensors header entry: content_digest of the file's tensors and other entries
MAX_FILE_BYTES = 256 * 2 ** 20  # embeddings take kilobytes to a few MiB; model checkpoints take GiB
MAX_VECTORS = 4096  # per file; text encoders read 77 to 512 tokens
VECTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
ZIP_ENCRYPTED = 0x61  # general-purpose flag bits: encrypted, strongly encrypted, a patch
ZIP_FOLDER = 0x10  # the DOS folder bit of an entry's external attributes
# what zipfile raises on a damaged archive, and torch.load (weights only) on a damaged record table or pickle
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError,
              struct.error)
TORCH_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                     struct.error, OverflowError)


class EmbeddingFileError(ValueError):
    """A file that cannot be read or written as an embedding, in one line."""


@dataclass
class Embeddings:
    """vectors: {placeholder: (n, D) or (D,) tensor as stored}; tokens: {placeholder: id} as recorded;
    fields: the format's other entries (kept so that load -> save gives the same file)."""

    vectors: dict
    tokens: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)
    format: str = "original"

    def matrices(self):
        """{placeholder: (n, D)}"""
        return {s: v.reshape(-1, v.shape[-1]) for s, v in self.vectors.items()}

    @property
    def injection(self):
        return self.fields.get("injection", "input")

    def renamed(self, old, new):
        """A copy with placeholder `old` called `new` (its recorded token id dropped)."""
        rename = {old: new}
        fields = dict(self.fields)
        if "context_token" in fields:
            fields["context_token"] = {rename.get(s, s): t for s, t in fields["context_token"].items()}
        return Embeddings({rename.get(s, s): v for s, v in self.vectors.items()},
                          {s: t for s, t in self.tokens.items() if s != old}, fields, self.format)


def band_edges(edges):
    """Timestep band edges as a strictly increasing tuple of positive ints (None or []: one band)."""
    edges = tuple(int(e) for e in (edges or ()))
    if any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"timestep_bands={list(edges)} must be increasing positive timesteps, e.g. [400]")
    return edges


def check_placeholder(where, placeholder):
    """`placeholder` if it is one word (a non-empty string without whitespace or control characters), else one
    line starting with `where` (the file read, or the one being written)."""
    if not isinstance(placeholder, str):
        raise EmbeddingFileError(f"{where}: a placeholder is named by {_kind(placeholder)}, not a string: the file "
                                 "is damaged")
    if not placeholder or not all(ch.isprintable() and not ch.isspace() for ch in placeholder):
        raise EmbeddingFileError(f"{where}: placeholder {placeholder!r} is not one word (it is empty or holds spaces "
                                 "or control characters): a placeholder is a string such as '<my-toy>'")
    return placeholder


def _kind(value):
    """A value in words, for messages: '-5', "the text 'abc'", 'a tensor of shape (2,) and dtype torch.int64'."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a value of type {type(value).__name__}"


# ---- reading ----------------------------------------------------------------------------------------

def read_embeddings(path, name=None):
    """Any of the four formats (auto-detected) -> Embeddings. `name`: the placeholder where the file has none.

    Anything unsound in the file raises EmbeddingFileError, one line naming it; a missing file FileNotFoundError.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_diffusers_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedding file not found: {path}")
    data, header = _read_container(path)
    fmt = detect_format(data, header)
    if fmt is None:
        raise EmbeddingFileError(
            f"{path} is not a textual-inversion embedding file: expected placeholders under the keys 'string_to_token' "
            "and 'string_to_param' (original), one {token: tensor} entry (diffusers), 'string_to_param' with 'name' "
            "(A1111) or 'emb_params' (kohya)")
    emb = READERS[fmt](data, header, path, name or _stem(path))
    _check_together(path, emb)
    return emb


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _check_together(path, emb):
    """Every placeholder one word, one width for all vectors, at most MAX_VECTORS of them."""
    for placeholder in emb.vectors:
        check_placeholder(path, placeholder)
    widths = {v.shape[-1] for v in emb.vectors.values()}
    if len(widths) > 1:
        raise EmbeddingFileError(f"{path} mixes vectors of widths {sorted(widths)}: the file is damaged")
    count = sum(v.shape[0] for v in emb.matrices().values())
    if count > MAX_VECTORS:
        raise EmbeddingFileError(f"{path} holds {count} vectors, more than the {MAX_VECTORS} an embedding file may "
                                 "hold (text encoders read at most a few hundred tokens): it is damaged or not an "
                                 "embedding")


def _read_container(path):
    """-> (dict, header): a torch pickle (weights only) or a safetensors file, told apart by content."""
    size = os.path.getsize(path)
    if size == 0:
        raise EmbeddingFileError(f"{path} is empty (0 bytes): the save was interrupted; use another checkpoint")
    if size > MAX_FILE_BYTES:
        raise EmbeddingFileError(f"{path} takes {size:,} bytes, more than the {MAX_FILE_BYTES // 2 ** 20} MiB an "
                                 "embedding file may take: it is likely a model checkpoint, not an embedding")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise EmbeddingFileError(f"cannot read {path}: {e.strerror}: check its permissions") from e
    if head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return _read_safetensors(path)
    if head[:2] == b"PK":  # a zip archive: torch's format since 1.6
        _check_zip(path)
    elif head[:1] != b"\x80":  # nor a legacy torch pickle
        raise EmbeddingFileError(f"{path} is neither a torch file nor a safetensors file: it is not an embedding")
    return _torch_load(path), {}


def _read_safetensors(path):
    """-> (nested dict, header entries other than the content hash); a recorded hash must match the content."""
    _check_safetensors_header(path)
    try:
        with safe_open(path, "pt") as f:
            flat, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise EmbeddingFileError(f"{path}: its safetensors header does not describe its data (sizes, offsets or types "
                                 "disagree): the file is damaged or truncated") from e
    recorded = header.pop(HASH_KEY, None)
    if recorded is not None and recorded != content_digest(flat, header):
        raise EmbeddingFileError(f"{path} does not match the sha256 recorded when it was saved: the file was changed "
                                 "after it was saved (damaged on disk or in transfer, or edited); use another copy")
    return _nest(path, flat), header


def _check_safetensors_header(path):
    """Refuse a safetensors file whose header length, text or JSON is damaged, before the library reads it."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        available = os.fstat(f.fileno()).st_size - 8
        if length > available:
            raise EmbeddingFileError(f"{path}: its safetensors header claims {length} bytes but {available} follow: "
                                     "the file is truncated or damaged")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise EmbeddingFileError(f"{path}: its safetensors header is not UTF-8 text: the file is damaged") from e
    except (ValueError, RecursionError) as e:
        raise EmbeddingFileError(f"{path}: its safetensors header is not valid JSON: the file is damaged") from e
    if not isinstance(header, dict):
        raise EmbeddingFileError(f"{path}: its safetensors header is not a JSON object: the file is damaged")


def _check_zip(path):
    """Refuse a zip-format torch file not laid out as torch.save writes it, or one failing a CRC-32 check
    (torch.load checks none, so a damaged byte would load as a changed value)."""
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as e:
        raise _damaged_zip(path) from e
    with archive:
        _check_zip_entries(path, archive.infolist())
        try:
            damaged = archive.testzip()
        except ZIP_ERRORS as e:
            raise _damaged_zip(path) from e
    if damaged is not None:
        raise EmbeddingFileError(f"{path}: its entry '{damaged}' fails its CRC-32 check: the file was changed after it "
                                 "was saved (damaged on disk or in transfer); use another copy")


def _damaged_zip(path):
    return EmbeddingFileError(f"{path}: its zip structure (a torch file is a zip archive) is damaged or truncated; "
                              "use another copy")


def _check_zip_entries(path, infos):
    """Entries as torch.save writes them: unique names under one folder holding data.pkl, each stored as it is (not
    compressed, encrypted or marked as a folder: torch's reader would hand back an unfilled buffer for a folder),
    unpacking to at most MAX_FILE_BYTES."""
    names = [info.filename for info in infos]
    folder = names[0].split("/")[0] if names else ""
    if (f"{folder}/data.pkl" not in names or len(set(names)) != len(names)
            or not all(name.startswith(f"{folder}/") for name in names)):
        raise EmbeddingFileError(f"{path} is a zip archive but not a torch file (torch.save writes one folder holding "
                                 "data.pkl): it is damaged or not an embedding")
    odd = [info.filename for info in infos if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & ZIP_ENCRYPTED
           or info.external_attr & ZIP_FOLDER or info.compress_size != info.file_size]
    if odd:
        raise EmbeddingFileError(f"{path}: its entry '{odd[0]}' is compressed, encrypted or marked as a folder, which "
                                 "torch.save never writes: the file is damaged or not an embedding")
    if sum(info.file_size for info in infos) > MAX_FILE_BYTES:
        raise EmbeddingFileError(f"{path} unpacks to more than {MAX_FILE_BYTES // 2 ** 20} MiB: it is damaged or not "
                                 "an embedding")


def _torch_load(path):
    """torch.load with weights_only: tensors and plain containers, never pickled code."""
    try:
        # reference files pickle an nn.ParameterDict; allowing that one class keeps weights_only loading
        with torch.serialization.safe_globals([nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise EmbeddingFileError(f"{path} pickles objects other than tensors and plain containers (it references "
                                     f"{found.group(1)}); loading never runs pickled code: re-save the vectors as "
                                     "tensors") from e
        raise EmbeddingFileError(f"{path}: its pickled data is damaged: use another copy") from e
    except TORCH_LOAD_ERRORS as e:
        raise EmbeddingFileError(f"{path} is not a readable torch file: it is damaged, truncated or not an "
                                 "embedding") from e


def _nest(path, flat):
    """Safetensors keys 'string_to_token.<s>' / 'string_to_param.<s>' -> nested dicts; other keys unchanged."""
    data, groups = {}, {}
    for key, value in flat.items():
        group, dot, placeholder = key.partition(".")
        if dot and group in NESTED:
            groups.setdefault(group, {})[placeholder] = value
        else:
            data[key] = value
    both = sorted(set(data) & set(groups))
    if both:
        raise EmbeddingFileError(f"{path} holds both a '{both[0]}' tensor and '{both[0]}.<placeholder>' entries: the "
                                 "file is damaged")
    return {**data, **groups}


def content_digest(tensors, header):
    """sha256 (hex) of a safetensors file's content. tensors: {name: tensor}, each hashed in name order by its name,
    dtype, shape and bytes; header: {str: str}, the other header entries."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(header, sort_keys=True).encode())
    return digest.hexdigest()


def detect_format(data, header):
    """The format of a loaded file's dict, or None."""
    if not isinstance(data, dict):
        return None
    if "string_to_param" in data:
        original = "string_to_token" in data and "name" not in data and "name" not in header
        return "original" if original else "a1111"
    if set(data) == {"emb_params"}:
        return "kohya"
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return "diffusers"
    return None


def checked_vectors(path, placeholder, value):
    """A dense floating tensor of shape (n, D) or (D,), finite, else one line naming the file and placeholder."""
    what = f"{path}: the vectors of '{placeholder}'"
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFileError(f"{what} are {_kind(value)}, not a tensor: the file is damaged")
    if value.layout != torch.strided:
        raise EmbeddingFileError(f"{what} are a sparse tensor; expected a dense one: the file is damaged")
    if value.dim() not in (1, 2) or value.numel() == 0:
        raise EmbeddingFileError(f"{what} have shape {tuple(value.shape)}; expected (n, D) or (D,)")
    if value.dtype not in VECTOR_DTYPES:
        raise EmbeddingFileError(f"{what} have dtype {value.dtype}; expected floating point (float16, bfloat16, "
                                 "float32 or float64)")
    if not torch.isfinite(value).all():
        raise EmbeddingFileError(f"{what} contain NaN or inf values: training diverged; use an earlier checkpoint")
    return value.detach()


def _mapping(path, value, what):
    """The entry `what` as {placeholder: value}: a dict (or the reference's nn.ParameterDict) keyed by placeholders."""
    if isinstance(value, nn.ParameterDict):
        value = _parameter_items(path, value, what)
    if not isinstance(value, dict):
        raise EmbeddingFileError(f"{path}: '{what}' is {_kind(value)}, not a table of placeholders: the file is "
                                 "damaged")
    return {check_placeholder(path, s): v for s, v in value.items()}


def _parameter_items(path, params, what):
    """A pickled nn.ParameterDict as a dict; its unpickled state may be damaged."""
    try:
        return dict(params.items())
    except (AttributeError, TypeError, KeyError) as e:
        raise EmbeddingFileError(f"{path}: '{what}' is a damaged parameter table: the file is damaged") from e


def _whole_number(path, what, value, least):
    """`value` as an int >= least: a Python int or a 0-d integer tensor (as the reference records token ids)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype in ID_DTYPES:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise EmbeddingFileError(f"{path}: {what} is {_kind(value)}; expected a whole number of at least {least}: "
                                 "the file is damaged")
    return value


def _header_json(path, header, key, default):
    """The header entry `key` (JSON text) decoded, or `default` where absent."""
    if key not in header:
        return default
    try:
        return json.loads(header[key])
    except (ValueError, RecursionError) as e:
        raise EmbeddingFileError(f"{path}: the header entry '{key}' is not valid JSON: the file is damaged") from e


def _read_bands(path, value):
    """Timestep band edges as recorded: a list of increasing positive whole numbers -> list, or None for one band."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise EmbeddingFileError(f"{path}: 'timestep_bands' is {_kind(value)}; expected a list of timesteps such as "
                                 "[400]: the file is damaged")
    edges = [_whole_number(path, "a timestep band edge", e, 1) for e in value]
    try:
        band_edges(edges)
    except ValueError as e:
        raise EmbeddingFileError(f"{path} records {e}: the file is damaged") from e
    return edges or None


def _read_original(data, header, path, name):
    params = _mapping(path, data["string_to_param"], "string_to_param")
    tokens = _mapping(path, data.get("string_to_token", {}), "string_to_token")
    if not params or set(tokens) != set(params):
        raise EmbeddingFileError(f"embedding file {path} lists placeholders {sorted(tokens)} with vectors for "
                                 f"{sorted(params)}: the file is damaged; save it again")
    emb = Embeddings({s: checked_vectors(path, s, p) for s, p in params.items()},
                     {s: _whole_number(path, f"the token id of '{s}'", t, -1) for s, t in tokens.items()},
                     _original_fields(data, header, path), "original")
    _check_band_rows(path, emb)
    return emb


def _original_fields(data, header, path):
    """injection and context_token (output-injection files), timestep_bands (banded files), checked."""
    fields = {}
    injection = data["injection"] if "injection" in data else header.get("injection")
    if injection is not None:
        if not isinstance(injection, str) or injection not in INJECTIONS:
            raise EmbeddingFileError(f"{path}: 'injection' is {_kind(injection)}; expected one of "
                                     f"{', '.join(INJECTIONS)}: the file is damaged")
        context = data["context_token"] if "context_token" in data else _header_json(path, header, "context_token", {})
        fields = {"injection": injection, "context_token": {
            s: _whole_number(path, f"the context token of '{s}'", t, 0)
            for s, t in _mapping(path, context, "context_token").items()}}
    bands = data["timestep_bands"] if "timestep_bands" in data else _header_json(path, header, "timestep_bands", None)
    bands = _read_bands(path, bands)
    if bands:
        fields["timestep_bands"] = bands
    return fields


def _check_band_rows(path, emb):
    """Banded files hold one set of vectors per band: each placeholder's row count a multiple of the bands."""
    bands = len(emb.fields.get("timestep_bands") or ()) + 1
    for placeholder, vectors in emb.matrices().items():
        if vectors.shape[0] % bands:
            raise EmbeddingFileError(f"embedding file {path} has {vectors.shape[0]} vectors for '{placeholder}', not a "
                                     f"multiple of its {bands} timestep bands: the file is damaged; save it again")


def _read_a1111(data, header, path, name):
    params = _mapping(path, data["string_to_param"], "string_to_param")
    if len(params) != 1:
        raise EmbeddingFileError(f"{path} is an A1111 embedding with {len(params)} entries under 'string_to_param'; "
                                 "A1111 files hold one: the file is damaged")
    if "name" in header:
        placeholder, fields = header["name"], _a1111_header_fields(path, header)
    else:
        placeholder, fields = _a1111_name(path, data, name), _a1111_fields(path, data)
    return Embeddings({placeholder: checked_vectors(path, placeholder, next(iter(params.values())))}, {}, fields,
                      "a1111")


def _a1111_header_fields(path, header):
    """The A1111 fields a safetensors header holds (all text; step a whole number)."""
    fields = {k: header[k] for k in A1111_FIELDS if k in header}
    if "step" in fields:
        fields["step"] = _whole_number(path, "the step", _header_json(path, header, "step", None), 0)
    return fields


def _a1111_fields(path, data):
    """step (a whole number or None), sd_checkpoint and sd_checkpoint_name (text or None), string_to_token."""
    step = data.get("step")
    fields = {"step": None if step is None else _whole_number(path, "the step", step, 0)}
    for key in A1111_FIELDS[1:]:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise EmbeddingFileError(f"{path}: '{key}' is {_kind(value)}; expected text: the file is damaged")
        fields[key] = value
    tokens = _mapping(path, data.get("string_to_token", A1111_STAR), "string_to_token")
    fields["string_to_token"] = {s: _whole_number(path, f"the token id of '{s}'", t, 0) for s, t in tokens.items()}
    return fields


def _a1111_name(path, data, name):
    """The placeholder of an A1111 .pt file: its 'name', else `name` (the file's stem)."""
    given = data.get("name")
    if given is not None and not isinstance(given, str):
        raise EmbeddingFileError(f"{path}: 'name' is {_kind(given)}, not text: the file is damaged")
    return given or name


def _read_diffusers(data, header, path, name):
    token, value = next(iter(data.items()))
    return Embeddings({token: checked_vectors(path, token, value)}, {}, {}, "diffusers")


def _read_kohya(data, header, path, name):
    return Embeddings({name: checked_vectors(path, name, data["emb_params"])}, {}, {}, "kohya")


def _read_diffusers_folder(folder):
    weights = [os.path.join(folder, f) for f in DIFFUSERS_WEIGHTS if os.path.isfile(os.path.join(folder, f))]
    if not weights:
        raise EmbeddingFileError(f"folder {folder} holds neither {' nor '.join(DIFFUSERS_WEIGHTS)}: give the folder "
                                 "of a diffusers textual-inversion concept or an embedding file")
    emb = read_embeddings(weights[0])
    if emb.format != "diffusers":
        raise EmbeddingFileError(f"{weights[0]} is a {emb.format} embedding, not diffusers' {{token: tensor}}")
    concept = os.path.join(folder, "type_of_concept.txt")
    if os.path.isfile(concept):
        emb.fields["type_of_concept"] = _read_text(concept)
    return emb


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError as e:
        raise EmbeddingFileError(f"{path} is not UTF-8 text: write 'object' or 'style' in it") from e


READERS = {"original": _read_original, "diffusers": _read_diffusers, "a1111": _read_a1111, "kohya": _read_kohya}


# ---- writing ----------------------------------------------------------------------------------------

def write_embeddings(emb, path, fmt="original", inputs=(), overwrite=True):
    """Write `emb` as `fmt`; everything is checked and serialised before the first file is written.

    inputs: the files `emb` was read from, never written over; overwrite=False refuses to replace an existing file.
    """
    if fmt not in WRITERS:
        raise EmbeddingFileError(f"unknown embedding format '{fmt}': use one of {', '.join(FORMATS)}")
    if fmt != "original" and emb.injection != "input":
        raise EmbeddingFileError(f"these vectors replace the encoder's final states (injection: {emb.injection}); "
                                 f"{fmt} loaders use vectors as token embeddings: keep the original format")
    if fmt != "original" and emb.fields.get("timestep_bands"):
        raise EmbeddingFileError(f"these vectors hold one set per timestep band ({emb.fields['timestep_bands']}); "
                                 f"{fmt} loaders use one set at every step: pick one with --band N (0: the lowest "
                                 "timesteps) or --band_at T (the set a sampling step at timestep T uses), or keep "
                                 "the original format (ldm.modules.embedding_bands.select_band)")
    path = os.fspath(path)
    for placeholder in emb.vectors:
        check_placeholder(f"cannot write {path}", placeholder)
    blobs = WRITERS[fmt](emb, path)
    _check_destination(path, list(blobs), inputs, overwrite)
    for path_out, blob in blobs.items():
        _write_file(path_out, blob)


def _check_destination(path, written, inputs, overwrite):
    """Refuse to write over one of `inputs` (the same file, or the concept folder holding it) and, unless
    `overwrite`, over any existing file. path: the file or folder asked for; written: the files it becomes."""
    targets = {_identity(p) for p in (path, *written)}
    for source in inputs:
        if targets & {_identity(p) for p in _source_paths(os.fspath(source))}:
            raise EmbeddingFileError(f"the output {path} is the input {source} (or its concept folder): writing it "
                                     "would replace the file being read; choose another output path")
    existing = [p for p in written if os.path.lexists(p)]
    if existing and not overwrite:
        raise EmbeddingFileError(f"{existing[0]} already exists: pass --overwrite to replace it, or choose another "
                                 "output path")


def _source_paths(source):
    """What reading `source` uses: a file (and the concept folder of a diffusers weights file), or a concept folder
    and the files it may hold."""
    if os.path.isdir(source):
        return [source, *(os.path.join(source, f) for f in CONCEPT_FILES)]
    if os.path.basename(source) in DIFFUSERS_WEIGHTS:
        return [source, os.path.dirname(os.path.abspath(source))]
    return [source]


def _identity(path):
    """(device, inode) of an existing path, so that links to one file compare equal; else its resolved path."""
    try:
        stat = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return stat.st_dev, stat.st_ino


def _write_file(path, blob):
    """Write `blob` to `path` atomically; an OSError names `path`, not the temporary file beside it."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(blob)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e


def torch_bytes(obj):
    """torch.save into memory: the same object gives the same bytes whatever the file name."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _safetensors(tensors, header=None):
    """safetensors bytes of {name: tensor} and `header` ({str: str}), with their content_digest under HASH_KEY.

    The library orders header entries at random; the JSON header is rewritten with sorted keys (padded with spaces
    so that the data stays 8-byte aligned), so that equal content gives equal bytes."""
    header = dict(header or {})
    blob = safetensors_bytes(tensors, {**header, HASH_KEY: content_digest(tensors, header)})
    length = int.from_bytes(blob[:8], "little")
    text = json.dumps(json.loads(blob[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + length:]


def _container(path, fmt):
    """'safetensors' or 'torch' from the suffix of `path`."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".bin", ".pth", ".ckpt"):
        return "torch"
    raise EmbeddingFileError(f"cannot tell the container of {path} from its suffix '{suffix}': name it .pt or "
                             f".safetensors ({fmt} format)")


def _single(emb, fmt):
    """(placeholder, vectors) of a one-placeholder embedding, else one line."""
    if len(emb.vectors) != 1:
        raise EmbeddingFileError(f"the {fmt} format holds one placeholder but these embeddings hold "
                                 f"{len(emb.vectors)} ({', '.join(emb.vectors)}): write them in the original format")
    return next(iter(emb.vectors.items()))


def _write_original(emb, path):
    vectors = {s: v.clone() for s, v in emb.matrices().items()}
    tokens = {s: torch.tensor(int(emb.tokens.get(s, -1))) for s in vectors}
    extra = {} if emb.injection == "input" else {"injection": emb.injection,
                                                 "context_token": dict(emb.fields.get("context_token", {}))}
    if emb.fields.get("timestep_bands"):
        extra["timestep_bands"] = [int(e) for e in emb.fields["timestep_bands"]]
    if _container(path, "original") == "torch":
        return {path: torch_bytes({"string_to_token": tokens, "string_to_param": vectors, **extra})}
    flat = {f"string_to_token.{s}": t for s, t in tokens.items()}
    flat.update({f"string_to_param.{s}": v for s, v in vectors.items()})
    return {path: _safetensors(flat, {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()})}


def _write_a1111(emb, path):
    placeholder, _ = _single(emb, "a1111")
    vectors = emb.matrices()[placeholder].clone()
    values = {k: emb.fields.get(k) for k in A1111_FIELDS}
    if _container(path, "a1111") == "torch":
        return {path: torch_bytes({"string_to_token": emb.fields.get("string_to_token", A1111_STAR),
                                   "string_to_param": {"*": vectors}, "name": placeholder, **values})}
    header = {"name": placeholder, **{k: str(v) for k, v in values.items() if v is not None}}
    return {path: _safetensors({"string_to_param.*": vectors}, header)}


def _write_diffusers(emb, path):
    token, vectors = _single(emb, "diffusers")
    weights = {token: vectors.clone()}
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".bin":
        return {path: torch_bytes(weights)}
    blob = _safetensors(weights, {"format": "pt"})  # the header diffusers' training script writes, and the hash
    if suffix == ".safetensors":
        return {path: blob}
    concept = emb.fields.get("type_of_concept", "object")
    return {os.path.join(path, "token_identifier.txt"): token.encode("utf-8"),
            os.path.join(path, "type_of_concept.txt"): concept.encode("utf-8"),
            os.path.join(path, DIFFUSERS_WEIGHTS[0]): blob}


def _write_kohya(emb, path):
    placeholder, _ = _single(emb, "kohya")
    weights = {"emb_params": emb.matrices()[placeholder].clone()}
    if _container(path, "kohya") == "torch":
        return {path: torch_bytes(weights)}
    return {path: _safetensors(weights)}


WRITERS = {"original": _write_original, "diffusers": _write_diffusers, "a1111": _write_a1111, "kohya": _write_kohya}
