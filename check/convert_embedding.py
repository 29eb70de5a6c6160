"""Convert a textual-inversion embedding between file formats (the source format is detected).

    python check/convert_embedding.py logs/RUN/checkpoints/embeddings.pt out/my-toy --to diffusers --name '<my-toy>'
    python check/convert_embedding.py learned_embeds.safetensors my-toy.pt --to a1111
    python check/convert_embedding.py kohya.safetensors e.pt --to original --name '<kohya-toy>'

Formats: original (this framework and the reference), diffusers (a folder with learned_embeds.safetensors,
token_identifier.txt and type_of_concept.txt, or a bare .safetensors/.bin file), a1111 (.pt or
.safetensors), kohya (.safetensors or .pt). --name sets the placeholder: needed where the source has
none (kohya: otherwise its file name) and useful where the target's tool needs a new word (diffusers
refuses a token already in its vocabulary, such as '*'). The destination is never the source (nor the
concept folder holding it); an existing destination file is replaced only with --overwrite. A mistake is one
`error:` line and exit status 2 (--debug: the full traceback).

Vectors trained with timestep bands (one set per band) go to diffusers, a1111 and kohya, which use one set at every
step, only with an explicit choice: --band N keeps band N's set (0: the lowest timesteps), --band_at T the set a
sampling step at timestep T uses. Without it such an export is refused; --to original keeps every band.

    python check/convert_embedding.py banded.pt out/my-toy --to diffusers --name '<my-toy>' --band_at 500
"""
import sys

from ldm.cli import ArgumentParser, run_command
from ldm.modules.embedding_bands import select_band
from ldm.modules.embedding_formats import FORMATS, read_embeddings, write_embeddings


def parse_args(argv=None):
    parser = ArgumentParser(prog="check/convert_embedding.py", description=__doc__)
    parser.add_argument("src", help="embedding file (or diffusers concept folder) in any supported format")
    parser.add_argument("dst", help="output file (.pt or .safetensors), or a folder for --to diffusers")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--name", help="placeholder string of the single placeholder (default: the source's)")
    parser.add_argument("--type_of_concept", help="diffusers type_of_concept.txt: object or style")
    parser.add_argument("--band", type=int, help="banded vectors: keep this band's set (0: the lowest timesteps)")
    parser.add_argument("--band_at", type=int, metavar="T",
                        help="banded vectors: keep the set a sampling step at timestep T uses")
    parser.add_argument("--overwrite", action="store_true", help="replace existing destination files")
    parser.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    return parser.parse_args(argv)


def convert(src, dst, fmt, name=None, type_of_concept=None, overwrite=False, band=None, band_at=None):
    """Read `src`, keep one timestep band's vectors if asked (`band`, or the band of timestep `band_at`), rename its
    one placeholder to `name` if given, write `dst` as `fmt` -> the Embeddings written.

    `dst` is never `src`; existing destination files are replaced only with `overwrite`."""
    emb = select_band(read_embeddings(src, name), band, band_at)
    if name is not None and name not in emb.vectors:
        if len(emb.vectors) != 1:
            raise ValueError(f"--name renames a single placeholder but {src} holds {len(emb.vectors)} "
                             f"({', '.join(emb.vectors)}): convert without --name")
        emb = emb.renamed(next(iter(emb.vectors)), name)
    if type_of_concept is not None:
        emb.fields["type_of_concept"] = type_of_concept
    write_embeddings(emb, dst, fmt, inputs=[src], overwrite=overwrite)
    return emb


def main(argv=None):
    """-> 0; a user's mistake exits with status 2 after one `error:` line."""
    args = parse_args(argv)
    emb = run_command(lambda: convert(args.src, args.dst, args.to, args.name, args.type_of_concept, args.overwrite,
                                      args.band, args.band_at), debug=args.debug)
    shapes = ", ".join(f"'{s}' {tuple(v.shape)}" for s, v in emb.vectors.items())
    print(f"{args.src} ({emb.format}) -> {args.dst} ({args.to}): {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
