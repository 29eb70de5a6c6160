"""How close each sampler gets to the sampling ODE's solution, on the shipped tiny model, from the same noise.

    python check/sampler_accuracy.py                                   # DDIM, PLMS, DPM-Solver++ at 10-50 steps
    python check/sampler_accuracy.py --embedding outputs/EMB.pt --steps 20 50
    python check/sampler_accuracy.py --spacing uniform                 # every sampler on the reference's grid

The reference is DDIM in 1,000 steps (the ODE solved to within 3e-4 of itself on either grid; --reference_steps).
For each sampler and step count: the median over samples of the latent error relative to the reference's spread,
and the share of samples more than 0.2 off (trajectories that fell into another image: the ODE of a guided model
is sensitive).
Prompts: "a photo of a *" and "a photo of a blue *" with --embedding, and two plain captions.
"""
import functools

import torch

from check.concept_table import load_ti_model
from ldm.cli import ArgumentParser, run_command
from ldm.models.diffusion.sampling import DEFAULT_SPACING, SAMPLERS, SPACINGS, sample_latents
from ldm.util import require_finite, require_positive

PLAIN = ["a photo of a red circle", "a photo of a green square"]
WITH_PLACEHOLDER = ["a photo of a *", "a photo of a blue *"]


def solve(model, captions, x_T, scale, sampler, steps, spacing):
    """x_T: (B, C, h, w) -> x_0 by `sampler` in `steps` on the `spacing` grid."""
    return sample_latents(model, captions, x_T.shape, steps, scale, sampler=sampler, x_T=x_T, spacing=spacing)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--embedding", default=None, help="a TI embedding of the tiny model (adds the * prompts)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=[10, 15, 20, 30, 50])
    p.add_argument("--spacing", default=None, choices=list(SPACINGS), help="default: each sampler's own")
    p.add_argument("--n", type=int, default=16, help="samples per prompt")
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference_steps", type=int, default=1000, help="DDIM steps of the reference solution")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    run_command(functools.partial(measure, args), args.debug)


@torch.no_grad()
def measure(args):
    """Print each sampler's error against the reference solution at each step count."""
    require_positive(n=args.n, steps=min(args.steps), reference_steps=args.reference_steps)
    require_finite(scale=args.scale)
    model = load_ti_model()
    prompts = PLAIN
    if args.embedding:
        model.embedding_manager.load(args.embedding)
        prompts = WITH_PLACEHOLDER + PLAIN
    captions = prompts * args.n
    x_T = torch.randn(len(captions), model.channels, model.image_size, model.image_size,
                      generator=torch.Generator().manual_seed(args.seed))
    reference = solve(model, captions, x_T, args.scale, "ddim", args.reference_steps, "uniform")
    print(f"{len(captions)} samples ({', '.join(prompts)}), guidance {args.scale}; latent error relative to the spread "
          f"of DDIM-{args.reference_steps}'s: median / share > 0.2")
    print(f"{'sampler':<10}{'spacing':<9}" + "".join(f"{s:>14}" for s in args.steps))
    for sampler in args.samplers:
        spacing = args.spacing or DEFAULT_SPACING[sampler]
        cells = []
        for steps in args.steps:
            err = (solve(model, captions, x_T, args.scale, sampler, steps, spacing) - reference).pow(2)
            err = err.mean(dim=(1, 2, 3)).sqrt() / reference.std()
            cells.append(f"{err.median():.3f} / {(err > 0.2).float().mean():.2f}")
        print(f"{sampler:<10}{spacing:<9}" + "".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
