"""Config-driven ablations: train every variant on the shipped concepts and tabulate what it gives.

    python check/ablations.py                                    # every configs/ablations/*.yaml, every concept
    python check/ablations.py --variants baseline v1_both --concepts checker_circle --n 32

A variant file lists config overlays and key=value overrides on top of the default TI settings
(configs/tiny-shapes/finetune.yaml). For each (variant, concept) one TI run is trained; the table
reports the final loss (mean of the last 100 steps), concept fidelity and editability (the concept
evaluator, `*` prompts), the median training step time and the trainable parameter count. Writes
<out>/ablations.md, ablations.csv and ablations.png (means over the concepts), and prints the table.
Pairs already in <out>/ablations.csv are reused: rerunning the command resumes it, and rows of several
runs copied into one ablations.csv make one table.
"""
import csv
import datetime
import functools
import glob
import os

import numpy as np
import torch

from check.concept_table import (
    FINETUNE,
    MODEL_DIR,
    VARIANTS,
    load_specs,
    load_ti_model,
    load_variant,
    make_sampler,
    train_concept,
)
from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.data.shapes.scores import evaluate_concept, format_table
from ldm.inference import load_modules, modules_beside
from ldm.models.diffusion.sampling import SAMPLERS
from ldm.util import atomic_path, atomic_write_text, require_finite, require_positive


def run_metrics(logdir):
    """(final loss: mean train/loss of the last 100 logged steps, median train/step_ms after 10 steps)."""
    path = os.path.join(logdir, "metrics.csv")
    if not os.path.isfile(path):
        raise UsageError(f"{path} is missing: the run logged no step (lower lightning.trainer.log_every_n_steps)")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    times = [float(r["train/step_ms"]) for r in rows if r.get("train/step_ms") and int(r["step"]) >= 10]
    return float(np.mean(losses[-100:])), float(np.median(times)) if times else float("nan")


def evaluate_run(run, overlays, overrides, weights, spec, args):
    """Fidelity and editability of the run's `*` on a fresh model built like the run."""
    model = load_ti_model("ldm", weights, overrides, overlays)
    embedding = os.path.join(run.logdir, "checkpoints", "embeddings.pt")
    model.embedding_manager.load(embedding)
    modules = modules_beside(embedding)
    if modules:
        load_modules(model, modules)
    generate = make_sampler(model, args.steps, args.scale, args.seed, args.sampler)
    return evaluate_concept(generate, spec, n=args.n, baseline=False)["pseudo_word"]


NUMERIC = {"final loss": float, "fidelity": float, "editability": float, "ms/step": float, "trainable params": int}


def read_rows(path):
    """The rows of an earlier ablations.csv (numbers parsed), or [] where there is none."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [{k: NUMERIC[k](v) if k in NUMERIC else v for k, v in row.items()} for row in csv.DictReader(f)]


def write_csv(rows, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def ablation_rows(variants, specs, args):
    """Train and score every (variant, concept); variants: {name: load_variant(name)}. A pair already in
    <out>/ablations.csv is kept, not rerun, and the file is rewritten after each new pair, so an interrupted
    command resumes where it stopped."""
    csv_path = os.path.join(args.out, "ablations.csv")
    done = {(r["variant"], r["concept"]): r for r in read_rows(csv_path)}
    rows = []
    for name, (overlays, overrides) in variants.items():
        for spec in specs:
            if (name, spec["name"]) in done:
                rows.append(done[(name, spec["name"])])
                continue
            with torch.enable_grad():
                run = train_concept(spec, args.weights, args.logdir, [*overrides, *args.train_overrides], overlays)
            loss, step_ms = run_metrics(run.logdir)
            scores = evaluate_run(run, overlays, overrides, args.weights, spec, args)
            rows.append({"variant": name, "concept": spec["name"], "final loss": loss,
                         "fidelity": scores["fidelity"], "editability": scores["editability"], "ms/step": step_ms,
                         "trainable params": sum(p.numel() for p in run.model.trainable_parameters())})
            done[(name, spec["name"])] = rows[-1]
            os.makedirs(args.out, exist_ok=True)
            write_csv(list(done.values()), csv_path)
    return rows


def means_by_variant(rows):
    """One row per variant: the mean of every numeric column over its concepts."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        means = {k: np.mean([r[k] for r in mine]) for k in mine[0] if k not in ("variant", "concept")}
        out.append({"variant": name, "concepts": len(mine),
                    **{k: int(v) if NUMERIC[k] is int and v == int(v) else float(v) for k, v in means.items()}})
    return out


def plot(summary, path):
    """Bars of fidelity and editability per variant -> PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(summary))
    fig, ax = plt.subplots(figsize=(1.2 * len(summary) + 2, 3.5))
    for k, key in enumerate(("fidelity", "editability")):
        ax.bar(x + (k - 0.5) * 0.38, [r[key] for r in summary], 0.38, label=key)
    ax.set_xticks(x, [r["variant"] for r in summary], rotation=20)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_outputs(rows, summary, header, out):
    os.makedirs(out, exist_ok=True)
    text = "\n\n".join([header, "Means over the concepts:", format_table(summary), "Per concept:", format_table(rows)])
    atomic_write_text(text + "\n", os.path.join(out, "ablations.md"))
    write_csv(rows, os.path.join(out, "ablations.csv"))
    plot(summary, os.path.join(out, "ablations.png"))
    return text


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--variants", nargs="*", default=None, help=f"names in {VARIANTS}/ (default: all)")
    p.add_argument("--concepts", nargs="*", default=None, help="concept names (default: all in dataset/)")
    p.add_argument("--weights", default=f"{MODEL_DIR}/model.safetensors")
    p.add_argument("--logdir", default="logs/ablations", help="parent folder of the TI runs")
    p.add_argument("--out", default="outputs/ablations")
    p.add_argument("--n", type=int, default=64, help="samples per prompt")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.add_argument("train_overrides", nargs="*", help="key=value overrides for every run")
    args = p.parse_args(argv)
    run_command(functools.partial(run, args), args.debug)


@torch.no_grad()
def run(args):
    """Check the flags and every variant file, train and score what is missing, write and print the tables."""
    require_positive(n=args.n, steps=args.steps)
    require_finite(scale=args.scale)
    names = args.variants or sorted(os.path.splitext(os.path.basename(f))[0] for f in glob.glob(f"{VARIANTS}/*.yaml"))
    variants = {name: load_variant(name) for name in names}  # a wrong name fails before any training
    rows = ablation_rows(variants, load_specs(args.concepts), args)
    header = (f"Measured {datetime.date.today()}: n={args.n} per prompt, {args.sampler} {args.steps} steps, "
              f"guidance {args.scale}; TI settings of {FINETUNE} plus each variant.")
    print(write_outputs(rows, means_by_variant(rows), header, args.out))


if __name__ == "__main__":
    main()
