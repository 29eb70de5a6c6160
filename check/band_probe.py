"""Which timestep band's vectors decide what: sample a banded embedding with its sets moved around.

    python check/band_probe.py --concept checker_circle --embedding outputs/concept_embeddings/checker_circle_seed23.pt
    python check/band_probe.py --concept checker_circle --embedding E --edges 550 700 850 --sets as-trained

For a two-band embedding (one set of vectors below the edge, one above) and each of the concept's prompts
("a photo of a *" and its edits), n samples are read analytically and the counts of every attribute value are
printed, for each way of placing the sets: as trained, the high set at every t, the low set at every t; and,
with --edges, the sets as trained but the edge moved to each given timestep at sampling.
"""
import collections
import functools

import torch

from check.concept_table import load_specs, load_ti_model, make_sampler
from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.data.shapes.palette import UNNAMED
from ldm.data.shapes.readers import read_attributes
from ldm.data.shapes.scores import FIDELITY_PROMPT
from ldm.util import require_finite, require_positive

PLACEMENTS = ("as-trained", "high-everywhere", "low-everywhere")


def placed(vectors, placement):
    """vectors: (2n, D), the low set then the high set -> (2n, D) with the sets placed as `placement` says."""
    low, high = vectors.chunk(2)
    return {"as-trained": vectors, "high-everywhere": torch.cat([high, high]),
            "low-everywhere": torch.cat([low, low])}[placement]


def value_counts(images):
    """images: list of (H, W, 3) uint8 -> {attribute: Counter of read values}."""
    reads = [read_attributes(img) for img in images]
    return {a: collections.Counter(r[a] for r in reads) for a in reads[0]}


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--concept", required=True, help="a dataset/<concept>/ name (its prompts and init word)")
    p.add_argument("--embedding", required=True, help="an embedding file trained with two timestep bands")
    p.add_argument("--sets", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    p.add_argument("--edges", nargs="*", type=int, default=[], help="sampling edges to try with the sets as trained")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    run_command(functools.partial(probe, args), args.debug)


@torch.no_grad()
def probe(args):
    """Print the attribute counts of every placement of the sets (and every --edges edge), prompt by prompt."""
    require_positive(n=args.n)
    require_finite(scale=args.scale)
    spec = load_specs([args.concept])[0]
    model = load_ti_model()
    manager = model.embedding_manager
    manager.load(args.embedding)
    if len(manager.timestep_bands) != 1:
        raise UsageError(f"{args.embedding} has timestep bands {list(manager.timestep_bands)}; "
                         "this probe takes a two-band embedding (one edge)")
    generate = make_sampler(model, 50, args.scale, 0)
    param = manager.string_to_param_dict["*"]
    trained, edge = param.detach().clone(), manager.timestep_bands
    runs = [(placement, edge) for placement in args.sets] + [("as-trained", (e,)) for e in args.edges]
    for placement, edges in runs:
        param.data.copy_(placed(trained, placement))
        manager.timestep_bands = edges
        for prompt in [FIDELITY_PROMPT] + [e["prompt"] for e in spec["edits"]]:
            counts = value_counts(generate(prompt, args.n))
            summary = "; ".join(f"{a} " + ", ".join(f"{v} {c}" for v, c in counts[a].most_common())
                                for a in ("colour", *UNNAMED))
            print(f"{placement} (edge {edges[0]}) | {prompt} | {summary}", flush=True)
    param.data.copy_(trained)


if __name__ == "__main__":
    main()
