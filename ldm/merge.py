"""Merge several textual-inversion embedding files into one (original format), as in the reference repo.

    python merge_embeddings.py --manager_ckpts cat.pt toy.safetensors concept_dir/ --output_path both.pt
    python merge_embeddings.py --manager_ckpts a.pt b.pt --output_path ab.pt --rename '*=<b-toy>'

Inputs may be in any supported format. Two files with the same placeholder clash: `--rename OLD=NEW`
renames OLD in the next file that clashes (give it once per clash, in file order); without it the
merge stops with one line naming both files. Nothing is written unless the whole merge succeeds; the
output is never one of the inputs, and an existing output file is replaced only with --overwrite.
A mistake is one `error:` line and exit status 2 (--debug: the full traceback).
"""

from ldm.cli import ArgumentParser, run_command
from ldm.modules.embedding_formats import Embeddings, read_embeddings, write_embeddings


def parse_args(argv=None):
    parser = ArgumentParser(prog="merge_embeddings.py", description=__doc__)
    parser.add_argument("--manager_ckpts", nargs="+", required=True, help="embedding files to merge, in order")
    parser.add_argument("--output_path", required=True, help="merged file (.pt or .safetensors)")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="rename a clashing placeholder of a later file (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output_path if it exists")
    parser.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    return parser.parse_args(argv)


def parse_renames(items):
    """['*=<b>'] -> [('*', '<b>')]"""
    pairs = []
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"--rename {item!r} is not OLD=NEW (e.g. --rename '*=<my-toy>')")
        pairs.append((old, new))
    return pairs


def merge(paths, renames=()):
    """Embedding files -> one Embeddings; clashing placeholders of later files take the renames in order."""
    merged, owner, pending = Embeddings({}), {}, list(renames)
    for path in paths:
        emb = read_embeddings(path)
        _check_joinable(merged, owner, path, emb)
        for placeholder in list(emb.vectors):
            if placeholder in owner:
                new = _take_rename(pending, placeholder, owner[placeholder], path)
                if new in owner or new in emb.vectors:
                    raise ValueError(f"--rename gives '{new}' to a placeholder of {path}, but '{new}' is already used "
                                     "there or in an earlier file: pick another new name")
                emb = emb.renamed(placeholder, new)
        owner.update({placeholder: path for placeholder in emb.vectors})
        merged.vectors.update(emb.matrices())
        merged.tokens.update(emb.tokens)
        if emb.injection != "input":
            merged.fields.update({"injection": emb.injection, "context_token": {
                **merged.fields.get("context_token", {}), **emb.fields["context_token"]}})
        if emb.fields.get("timestep_bands"):
            merged.fields["timestep_bands"] = list(emb.fields["timestep_bands"])
    if pending:
        raise ValueError(f"--rename {pending[0][0]}={pending[0][1]} matched no clashing placeholder: drop it")
    return merged


def _check_joinable(merged, owner, path, emb):
    if not merged.vectors:
        return
    first = next(iter(owner.values()))
    width, other = next(iter(merged.vectors.values())).shape[-1], next(iter(emb.vectors.values())).shape[-1]
    if width != other:
        raise ValueError(f"{first} has vectors of width {width} but {path} has width {other}: they belong to "
                         "different text encoders and cannot be merged")
    if merged.injection != emb.injection:
        raise ValueError(f"{first} holds injection '{merged.injection}' vectors but {path} holds '{emb.injection}' "
                         "ones: merge files of one injection point")
    bands, other_bands = merged.fields.get("timestep_bands") or [], emb.fields.get("timestep_bands") or []
    if list(bands) != list(other_bands):
        raise ValueError(f"{first} holds vectors for timestep bands {list(bands)} but {path} for {list(other_bands)}: "
                         "merge files trained with the same timestep_bands")


def _take_rename(pending, placeholder, first, path):
    for i, (old, new) in enumerate(pending):
        if old == placeholder:
            return pending.pop(i)[1]
    raise ValueError(f"placeholder '{placeholder}' is in both {first} and {path}: rename one with "
                     f"--rename '{placeholder}=NEW'")


def merge_to_file(args):
    """Merge the files of the command line and write the result -> the merged Embeddings."""
    merged = merge(args.manager_ckpts, parse_renames(args.rename))
    write_embeddings(merged, args.output_path, "original", inputs=args.manager_ckpts, overwrite=args.overwrite)
    return merged


def main(argv=None):
    """-> 0; a user's mistake exits with status 2 after one `error:` line."""
    args = parse_args(argv)
    merged = run_command(lambda: merge_to_file(args), debug=args.debug)
    print(f"{args.output_path}: {', '.join(f'{s!r} {tuple(v.shape)}' for s, v in merged.vectors.items())}")
    return 0

