"""Time to quality: train a concept with a recipe on one CPU core, score its embedding every N steps, and print the
wall time and the steps at which it first meets the targets.

    python bench/time_to_quality.py --set heldout --recipes ours original --every 100
    python bench/time_to_quality.py --concepts checker_square_lilac --recipes ours --seeds 23 1 2 key=value ...

A recipe is the default TI settings (configs/tiny-shapes/finetune.yaml) plus its overlays (RECIPES): `ours` is the
defaults; `original` (configs/bench/original.yaml) is the original method's: one vector, one set for all
timesteps, batch 4 at lr 0.02 (base 5e-3 x batch 4), the plain templates, no colour word in any caption; `v1` is the
defaults with improvement v1's adapter and block (configs/improvement/v1.yaml), each checkpoint scored with the
modules it wrote beside its vectors (modules_gs-<step>.safetensors). Trailing
key=value arguments override every recipe. Each run trains with one torch thread and writes its vectors every
`--every` steps (the framework's embeddings_gs-<step>.pt); the wall time of a checkpoint is the time from the start
of the run (model loading included) to the moment its file was written, kept in the run folder's
time_to_quality.json. A run folder that already holds that file is scored again without training (e.g. after a
reader changes). Each checkpoint is scored with ldm.data.shapes.scores on `--n` samples per prompt (default 32,
DPM-Solver++ 20 steps, guidance 3: fewer samples than the concept table's 64, so a share moves by about 0.08);
the baseline (the init word) once per concept. Targets (TARGETS): fidelity >= 0.8 and >= 3x the baseline,
editability >= 0.6.
"""
import argparse
import functools
import glob
import json
import os
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from check.concept_table import (  # noqa: E402
    check_edit_when,
    load_specs,
    load_ti_model,
    make_sampler,
    modules_loaded,
    required_modules,
    scheduled_edits,
    train_concept,
)
from ldm.cli import UsageError, run_command  # noqa: E402
from ldm.data.shapes.concept_sets import CONCEPT_SETS  # noqa: E402
from ldm.data.shapes.scores import PLACEHOLDER, evaluate_concept, format_table, per_attribute_match  # noqa: E402
from ldm.inference import modules_beside  # noqa: E402
from ldm.models.diffusion.sampling import SAMPLERS  # noqa: E402
from ldm.util import atomic_write_text, require_positive  # noqa: E402

RECIPES = {"ours": [], "original": ["configs/bench/original.yaml"], "v1": ["configs/improvement/v1.yaml"]}
TARGETS = (0.8, 3.0, 0.6)  # fidelity at least, and at least this many times the baseline's; editability at least
TIMES = "time_to_quality.json"
GS_FILE = re.compile(r"embeddings_gs-(\d+)\.pt$")


def checkpoint_times(ckptdir, start):
    """{step: seconds from `start` to the moment embeddings_gs-<step>.pt was written} of a run's checkpoints."""
    times = {}
    for path in glob.glob(os.path.join(ckptdir, "embeddings_gs-*.pt")):
        match = GS_FILE.search(os.path.basename(path))
        if match:
            times[int(match.group(1))] = os.path.getmtime(path) - start
    return dict(sorted(times.items()))


def find_run(logdir, name):
    """The newest run folder `<logdir>/*_<name>` that holds TIMES, or None."""
    runs = [r for r in sorted(glob.glob(os.path.join(logdir, f"*_{name}"))) if os.path.isfile(os.path.join(r, TIMES))]
    return runs[-1] if runs else None


def train_timed(spec, recipe, seed, args):
    """Train (or find) the run of `spec` with `recipe` and `seed` -> (run folder, {step: wall s})."""
    logdir = os.path.join(args.logdir, recipe)
    run = find_run(logdir, f"{spec['name']}_seed{seed}")
    if run is None:
        extra = [f"lightning.modelcheckpoint.params.every_n_train_steps={args.every}",
                 "lightning.callbacks.image_logger.params.disabled=true", *args.overrides]
        if args.steps:
            extra.append(f"lightning.trainer.max_steps={args.steps}")
        torch.set_num_threads(args.threads)
        start = time.time()
        with torch.enable_grad():
            run = train_concept(spec, args.weights, logdir, extra, overlays=RECIPES[recipe], seed=seed).logdir
        times = checkpoint_times(os.path.join(run, "checkpoints"), start)
        atomic_write_text(json.dumps({str(k): round(v, 2) for k, v in times.items()}, indent=1) + "\n",
                          os.path.join(run, TIMES))
    with open(os.path.join(run, TIMES)) as f:
        return run, {int(k): v for k, v in json.load(f).items()}


def meets(scores, baseline):
    """Whether `scores` meet TARGETS against the init word's `baseline` scores."""
    least, factor, edit_least = TARGETS
    fid = scores["fidelity"]
    return fid >= least and fid >= factor * baseline["fidelity"] and scores["editability"] >= edit_least


def remembering(generate):
    """generate(prompt, n) that also keeps each prompt's last images in its `.images` dict."""
    def wrapped(prompt, n):
        wrapped.images[prompt] = generate(prompt, n)
        return wrapped.images[prompt]
    wrapped.images = {}
    return wrapped


def edit_attributes(images, spec):
    """{"edit <attribute>": share of the edit prompts' samples with the edit's value (colour) or the concept's}."""
    shares = []
    for edit in spec["edits"]:
        expected = {**spec["attributes"], edit["attribute"]: edit["value"]}
        shares.append(per_attribute_match(images[edit["prompt"]], {"attributes": expected}))
    return {f"edit {a}": float(np.mean([s[a] for s in shares])) for a in shares[0]}


def score_run(model, generate, spec, run, times, baseline, args):
    """Table rows of every checkpoint of a run: step, wall s, fidelity, editability, the attributes of the
    "a photo of a *" samples and of the edits' samples, targets met."""
    rows, generate = [], remembering(generate)
    for step, wall in times.items():
        embedding = os.path.join(run, "checkpoints", f"embeddings_gs-{step}.pt")
        model.embedding_manager.load(embedding)
        with modules_loaded(model, checkpoint_modules(model, embedding)):
            scores = evaluate_concept(generate, spec, n=args.n, baseline=False)["pseudo_word"]
        rows.append({"step": step, "wall s": round(wall, 1), "fidelity": scores["fidelity"],
                     "editability": scores["editability"], **scores["per_attribute"],
                     **edit_attributes(generate.images, spec), "targets": "yes" if meets(scores, baseline) else "no"})
    return rows


def checkpoint_modules(model, embedding):
    """The modules file written with a checkpoint's vectors, for a model that trains modules (None otherwise)."""
    return required_modules(model, modules_beside(embedding), f"the modules_gs file beside {embedding}",
                            "train the run again in a new --logdir")


def init_word_scores(generate, spec, n):
    """The baseline: the concept's prompts with `*` replaced by its init word (the concept table's baseline)."""
    def with_init_word(prompt, count):
        return generate(prompt.replace(PLACEHOLDER, spec["init_word"]), count)
    return evaluate_concept(with_init_word, spec, n=n, baseline=False)["pseudo_word"]


def first_hit(rows):
    """The first row that meets the targets, or None."""
    return next((r for r in rows if r["targets"] == "yes"), None)


def summary_row(recipe, spec, seed, rows):
    hit, last = first_hit(rows), rows[-1]
    return {"recipe": recipe, "concept": spec["name"], "seed": seed,
            "steps to targets": hit["step"] if hit else f"not by {last['step']}",
            "wall s to targets": hit["wall s"] if hit else "-", "last fidelity": last["fidelity"],
            "last editability": last["editability"], "last step wall s": last["wall s"]}


def bench(args):
    """Train and score every (recipe, concept, seed) -> markdown sections: settings, each run's curve, the summary."""
    specs = [scheduled_edits(spec, args.edit_when) for spec in load_specs(args.concepts, args.set)]
    models = {r: load_ti_model("ldm", args.weights, args.overrides, RECIPES[r]) for r in args.recipes}
    samplers = {r: make_sampler(m, args.ddim_steps, args.scale, args.sample_seed, args.sampler)
                for r, m in models.items()}
    edits = f"edit words from {args.edit_when:g} of the way; " if args.edit_when is not None else ""
    sections = [f"n={args.n} per prompt, {args.sampler} {args.ddim_steps} steps, guidance {args.scale}; {edits}"
                f"training on {args.threads} thread(s); targets: fidelity >= {TARGETS[0]} and >= {TARGETS[1]:g}x "
                f"the baseline, editability >= {TARGETS[2]}."]
    summary = []
    for spec in specs:
        baseline = init_word_scores(samplers[args.recipes[0]], spec, args.n)
        sections.append(f"{spec['name']}: init-word baseline fidelity {baseline['fidelity']:.3f}, "
                        f"editability {baseline['editability']:.3f}")
        for recipe in args.recipes:
            for seed in args.seeds:
                run, times = train_timed(spec, recipe, seed, args)
                rows = score_run(models[recipe], samplers[recipe], spec, run, times, baseline, args)
                sections.append(f"{recipe}, {spec['name']}, seed {seed} ({run}):\n\n" + format_table(rows))
                summary.append(summary_row(recipe, spec, seed, rows))
                print(sections[-1] + "\n", flush=True)
    sections.append("Time to the targets:\n\n" + format_table(summary))
    return sections


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--set", default="heldout", choices=sorted(CONCEPT_SETS), help="concept set (default heldout)")
    p.add_argument("--concepts", nargs="*", default=None, help="concept names of dataset/ (instead of --set)")
    p.add_argument("--seeds", type=int, nargs="+", default=[23], help="TI seeds")
    p.add_argument("--every", type=int, default=100, help="score the embedding every this many steps")
    p.add_argument("--steps", type=int, default=None, help="train this many steps (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training (default one core)")
    p.add_argument("--n", type=int, default=32, help="samples per prompt")
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    p.add_argument("--ddim_steps", type=int, default=20, help="sampling steps")
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale")
    p.add_argument("--sample_seed", type=int, default=0)
    p.add_argument("--edit_when", type=float, default=None, metavar="F",
                   help="edit prompts with the colour word from F of the way on (\"a photo of a [red :F]*\")")
    p.add_argument("--weights", default="models/ldm/tiny-shapes/model.safetensors")
    p.add_argument("--logdir", default="logs/time_to_quality", help="runs go to <logdir>/<recipe>/")
    p.add_argument("--out", default=None, help="write the markdown here too")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every recipe's TI runs")
    return p


@torch.no_grad()
def run(args):
    require_positive(every=args.every, threads=args.threads, n=args.n, ddim_steps=args.ddim_steps)
    if args.steps is not None:
        require_positive(steps=args.steps)
    check_edit_when(args.edit_when)
    if not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights} not found: give the model's .safetensors")
    sections = bench(args)
    print(sections[-1])  # the curves were printed as each run was scored
    if args.out:
        atomic_write_text("\n\n".join(sections) + "\n", args.out)


def main(argv=None):
    args = get_parser().parse_intermixed_args(argv)
    run_command(functools.partial(run, args), args.debug)


if __name__ == "__main__":
    main()
