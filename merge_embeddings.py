"""Merge several textual-inversion embedding files into one (original format), as in the reference repo.

    python merge_embeddings.py --manager_ckpts cat.pt toy.safetensors concept_dir/ --output_path both.pt
    python merge_embeddings.py --manager_ckpts a.pt b.pt --output_path ab.pt --rename '*=<b-toy>'

Inputs may be in any supported format. Two files with the same placeholder clash: `--rename OLD=NEW`
renames OLD in the next file that clashes (give it once per clash, in file order); without it the
merge stops with one line naming both files. Nothing is written unless the whole merge succeeds; the
output is never one of the inputs, and an existing output file is replaced only with --overwrite.
A mistake is one `error:` line and exit status 2 (--debug: the full traceback).
"""
from ldm.merge import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
