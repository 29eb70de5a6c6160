"""Score a folder of generated shapes-world images against a concept (ldm.data.shapes.scores):

    python -m check.concept_eval --images outputs/txt2img --spec dataset/checker_circle/concept.json
"""
import functools
import os

from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.data.images import list_images, load_rgb
from ldm.data.shapes.scores import concept_fidelity, edit_success, format_table, per_attribute_match, read_spec


def _find_edit(spec, prompt):
    """The spec's edit with this prompt, or None."""
    return next((e for e in spec["edits"] if e["prompt"] == prompt), None)


def main(argv=None):
    parser = ArgumentParser(description="Score a folder of generated PNGs against a concept spec.")
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument("--spec", required=True, help="concept.json written by ldm.data.shapes.world")
    parser.add_argument("--edit", help="score the folder as samples of this edit prompt of the spec")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    run_command(functools.partial(score_folder, args), args.debug)


def score_folder(args):
    """Print the table row of the images in args.images scored against args.spec (and args.edit)."""
    spec = read_spec(args.spec)
    edit = _find_edit(spec, args.edit)
    if args.edit and edit is None:
        raise UsageError(f"--edit '{args.edit}' is not in {args.spec}: use one of "
                         + ", ".join(repr(e["prompt"]) for e in spec["edits"]))
    if not os.path.isdir(args.images):
        raise FileNotFoundError(f"--images {args.images} is not a folder: give the folder of generated samples")
    images = [load_rgb(p) for p in list_images(args.images)]
    row = {"concept": spec["name"], "images": len(images)}
    if edit:
        row["edit_success"] = edit_success(images, spec, edit)
    row["fidelity"] = concept_fidelity(images, spec)
    row.update(per_attribute_match(images, spec))
    print(format_table([row]))


if __name__ == "__main__":
    main()
