"""Convert a textual-inversion embedding between file formats (the source format is detected).

    python check/convert_embedding.py logs/RUN/checkpoints/embeddings.pt out/my-toy --to diffusers --name '<my-toy>'
    python check/convert_embedding.py learned_embeds.safetensors my-toy.pt --to a1111
    python check/convert_embedding.py kohya.safetensors e.pt --to original --name '<kohya-toy>'

Formats: original (this framework and the reference), diffusers (a folder with learned_embeds.safetensors,
token_identifier.txt and type_of_concept.txt, or a bare .safetensors/.bin file), a1111 (.pt or
.safetensors), kohya (.safetensors or .pt). --name sets the placeholder: needed where the source has
none (kohya: otherwise its file name) and useful where the target's tool needs a new word (diffusers
refuses a token already in its vocabulary, such as '*').
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a fresh clone

from ldm.modules.embedding_formats import FORMATS, read_embeddings, write_embeddings  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="embedding file (or diffusers concept folder) in any supported format")
    parser.add_argument("dst", help="output file (.pt or .safetensors), or a folder for --to diffusers")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--name", help="placeholder string of the single placeholder (default: the source's)")
    parser.add_argument("--type_of_concept", help="diffusers type_of_concept.txt: object or style")
    return parser.parse_args(argv)


def convert(src, dst, fmt, name=None, type_of_concept=None):
    """Read `src`, rename its one placeholder to `name` if given, write `dst` as `fmt` -> the Embeddings written."""
    emb = read_embeddings(src, name)
    if name is not None and name not in emb.vectors:
        if len(emb.vectors) != 1:
            raise ValueError(f"--name renames a single placeholder but {src} holds {len(emb.vectors)} "
                             f"({', '.join(emb.vectors)}): convert without --name")
        emb = emb.renamed(next(iter(emb.vectors)), name)
    if type_of_concept is not None:
        emb.fields["type_of_concept"] = type_of_concept
    write_embeddings(emb, dst, fmt)
    return emb


def main(argv=None):
    args = parse_args(argv)
    try:
        emb = convert(args.src, args.dst, args.to, args.name, args.type_of_concept)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"'{s}' {tuple(v.shape)}" for s, v in emb.vectors.items())
    print(f"{args.src} ({emb.format}) -> {args.dst} ({args.to}): {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
