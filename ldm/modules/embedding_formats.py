"""Textual-inversion embedding files: four formats, each one reader/writer pair, detected on load.

| format    | files                          | layout                                                             |
| --------- | ------------------------------ | ------------------------------------------------------------------ |
| original  | .pt, .safetensors              | {"string_to_token": {s: () int64}, "string_to_param": {s: (n, D)}}; safetensors keys "string_to_token.<s>", "string_to_param.<s>"; output-injection files add "injection" and "context_token", timestep-banded ones "timestep_bands" (safetensors: in the header) |
| diffusers | folder, .safetensors, .bin     | {token: (n, D) or (D,)}; a folder holds learned_embeds.safetensors (or .bin), token_identifier.txt, type_of_concept.txt |
| a1111     | .pt, .safetensors              | {"string_to_token": {"*": 265}, "string_to_param": {"*": (n, D)}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}; safetensors: "string_to_param.*", the other fields in the header |
| kohya     | .safetensors, .pt              | {"emb_params": (n, D)}; the placeholder is the file's stem (or a given name) |

Token ids recorded in original files are those of the writer's tokenizer; -1 where the writer had
none (converted or merged files). Reading never runs pickled code (safetensors, or torch.load with
weights_only). Writing serialises everything in memory first, then writes each file atomically.
"""
import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ldm.util import atomic_path

FORMATS = ("original", "diffusers", "a1111", "kohya")
DIFFUSERS_WEIGHTS = ("learned_embeds.safetensors", "learned_embeds.bin")
A1111_FIELDS = ("step", "sd_checkpoint", "sd_checkpoint_name")
A1111_STAR = {"*": 265}  # what AUTOMATIC1111 writes as string_to_token (CLIP's id of '*')


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


# ---- reading ----------------------------------------------------------------------------------------

def read_embeddings(path, name=None):
    """Any of the four formats (auto-detected) -> Embeddings. `name`: the placeholder where the file has none."""
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
    widths = {v.shape[-1] for v in emb.vectors.values()}
    if len(widths) > 1:
        raise EmbeddingFileError(f"{path} mixes vectors of widths {sorted(widths)}: the file is damaged")
    return emb


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _read_container(path):
    """-> (dict, header): a torch pickle (weights only) or a safetensors file, told apart by content."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise EmbeddingFileError(f"{path} is empty (0 bytes): the save was interrupted; use another checkpoint")
    safetensors, torch_file = head[8:9] == b"{", head[:2] == b"PK" or head[:1] == b"\x80"  # zip or legacy pickle
    if not (safetensors or torch_file):
        raise EmbeddingFileError(f"{path} is neither a torch file nor a safetensors file: it is not an embedding")
    try:
        if safetensors:  # an 8-byte header length, then the JSON header
            with safe_open(path, "pt") as f:
                return _nest({k: f.get_tensor(k) for k in f.keys()}), dict(f.metadata() or {})
        # reference files pickle an nn.ParameterDict; allowing that one class keeps weights_only loading
        with torch.serialization.safe_globals([nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise EmbeddingFileError(f"{path} pickles objects other than tensors and plain containers{what}; loading "
                                 "never runs pickled code: re-save the vectors as tensors") from e
    except (RuntimeError, EOFError, SafetensorError, OSError) as e:
        raise EmbeddingFileError(f"{path} is neither a readable torch file nor a safetensors file "
                                 f"({type(e).__name__}): it is damaged or not an embedding") from e


def _nest(flat):
    """Safetensors keys 'string_to_token.<s>' / 'string_to_param.<s>' -> nested dicts; other keys unchanged."""
    data = {}
    for key, value in flat.items():
        group, dot, placeholder = key.partition(".")
        if dot and group in ("string_to_token", "string_to_param"):
            data.setdefault(group, {})[placeholder] = value
        else:
            data[key] = value
    return data


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
    """A tensor of shape (n, D) or (D,), floating and finite, else one line naming the file and placeholder."""
    what = f"{path}: the vectors of '{placeholder}'"
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFileError(f"{what} are a {type(value).__name__}, not a tensor: the file is damaged")
    if value.dim() not in (1, 2) or value.numel() == 0:
        raise EmbeddingFileError(f"{what} have shape {tuple(value.shape)}; expected (n, D) or (D,)")
    if not value.is_floating_point():
        raise EmbeddingFileError(f"{what} have dtype {value.dtype}; expected floating point")
    if not torch.isfinite(value).all():
        raise EmbeddingFileError(f"{what} contain NaN or inf values: training diverged; use an earlier checkpoint")
    return value.detach()


def _read_original(data, header, path, name):
    tokens, params = data.get("string_to_token") or {}, data["string_to_param"]
    if not params or set(tokens) != set(params):
        raise EmbeddingFileError(f"embedding file {path} lists placeholders {sorted(tokens)} with vectors for "
                                 f"{sorted(params)}: the file is damaged; save it again")
    fields = {}
    injection = data.get("injection", header.get("injection"))
    if injection is not None:
        context = data.get("context_token") or json.loads(header.get("context_token", "{}"))
        fields = {"injection": str(injection), "context_token": {s: int(t) for s, t in context.items()}}
    bands = data.get("timestep_bands", json.loads(header.get("timestep_bands", "null")))
    if bands:
        fields["timestep_bands"] = [int(e) for e in bands]
    return Embeddings({s: checked_vectors(path, s, p) for s, p in params.items()},
                      {s: int(t) for s, t in tokens.items()}, fields, "original")


def _read_a1111(data, header, path, name):
    params = data["string_to_param"]
    if len(params) != 1:
        raise EmbeddingFileError(f"{path} is an A1111 embedding with {len(params)} entries under 'string_to_param'; "
                                 "A1111 files hold one: the file is damaged")
    if "name" in header:
        fields = {k: (int(header[k]) if k == "step" else header[k]) for k in A1111_FIELDS if k in header}
        placeholder = header["name"]
    else:
        fields = {k: data.get(k) for k in A1111_FIELDS}
        fields["string_to_token"] = data.get("string_to_token", A1111_STAR)
        placeholder = data.get("name") or name
    return Embeddings({placeholder: checked_vectors(path, placeholder, next(iter(params.values())))}, {}, fields,
                      "a1111")


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
        with open(concept, encoding="utf-8") as f:
            emb.fields["type_of_concept"] = f.read().strip()
    return emb


READERS = {"original": _read_original, "diffusers": _read_diffusers, "a1111": _read_a1111, "kohya": _read_kohya}


# ---- writing ----------------------------------------------------------------------------------------

def write_embeddings(emb, path, fmt="original"):
    """Write `emb` as `fmt`; everything is checked and serialised before the first file is written."""
    if fmt not in WRITERS:
        raise EmbeddingFileError(f"unknown embedding format '{fmt}': use one of {', '.join(FORMATS)}")
    if fmt != "original" and emb.injection != "input":
        raise EmbeddingFileError(f"these vectors replace the encoder's final states (injection: {emb.injection}); "
                                 f"{fmt} loaders use vectors as token embeddings: keep the original format")
    if fmt != "original" and emb.fields.get("timestep_bands"):
        raise EmbeddingFileError(f"these vectors hold one set per timestep band ({emb.fields['timestep_bands']}); "
                                 f"{fmt} loaders use one set at every step: keep the original format, or train with "
                                 "timestep_bands: [] (configs/ablations/one_band.yaml)")
    for path_out, blob in WRITERS[fmt](emb, os.fspath(path)).items():
        with atomic_path(path_out) as tmp, open(tmp, "wb") as f:
            f.write(blob)


def torch_bytes(obj):
    """torch.save into memory: the same object gives the same bytes whatever the file name."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


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
    header = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()} or None
    return {path: safetensors_bytes(flat, header)}


def _write_a1111(emb, path):
    placeholder, _ = _single(emb, "a1111")
    vectors = emb.matrices()[placeholder].clone()
    values = {k: emb.fields.get(k) for k in A1111_FIELDS}
    if _container(path, "a1111") == "torch":
        return {path: torch_bytes({"string_to_token": emb.fields.get("string_to_token", A1111_STAR),
                                   "string_to_param": {"*": vectors}, "name": placeholder, **values})}
    header = {"name": placeholder, **{k: str(v) for k, v in values.items() if v is not None}}
    return {path: safetensors_bytes({"string_to_param.*": vectors}, header)}


def _write_diffusers(emb, path):
    token, vectors = _single(emb, "diffusers")
    weights = {token: vectors.clone()}
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".bin":
        return {path: torch_bytes(weights)}
    blob = safetensors_bytes(weights, {"format": "pt"})  # the header diffusers' training script writes
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
    return {path: safetensors_bytes(weights)}


WRITERS = {"original": _write_original, "diffusers": _write_diffusers, "a1111": _write_a1111, "kohya": _write_kohya}
