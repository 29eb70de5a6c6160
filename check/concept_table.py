"""The textual-inversion quality table of every shipped concept on the shipped tiny model.

    python check/concept_table.py                      # train missing embeddings, then score all
    python check/concept_table.py --captions           # also: does the pretrained model follow captions?
    python check/concept_table.py --captions --concepts   # only that (no concept, no TI)
    python check/concept_table.py --korean             # the same embeddings, prompted in Korean through v2
    python check/concept_table.py --model ar             # the autoregressive model (raster order)
    python check/concept_table.py --model ar-scales      # the next-scale autoregressive model
    python check/concept_table.py --model ar model.params.personalization_config.params.injection=output
    python check/concept_table.py --seeds 23 1 2 --jobs 2   # three TI runs per concept, two at a time
    python check/concept_table.py --set heldout          # the held-out concepts instead of the shipped six
    python check/concept_table.py --variant v1_both --embeddings DIR   # an ablation variant (configs/ablations/)

For each `dataset/<concept>/` of the set (`--set`: the shipped six by default) and each TI seed a TI embedding is
trained with the default settings (configs/tiny-shapes/finetune.yaml) unless `<embeddings>/<concept>_seed<seed>.pt`
exists, then n samples of "a photo of a *" and of each edit prompt are read analytically (ldm.data.shapes.scores),
beside the init-word baseline (sampled once: it does not depend on the TI seed). With several seeds the `*` row
holds the means over the seeds and each seed's fidelity and editability; a last line counts the concepts that
meet the targets by those means (diffusion: fidelity >= 0.6 and >= 3x the baseline, editability >= 0.5;
autoregressive: fidelity above zero and >= 2x the baseline). Prints markdown; `--out` also writes it to a
file. With `--korean` every prompt is translated (improvement/v2/corpus.py) and conditions the model through
the v2 conditioner (configs/improvement/v2.yaml); the embeddings are the same English-trained files.
With `--variant` the runs train and score with a variant's overlays and overrides (configs/ablations/<name>.yaml);
a variant that trains conditioner modules (improvement v1) keeps them beside each embedding as
`<concept>_seed<seed>.modules.safetensors`, loaded for that embedding's samples only.
"""
import concurrent.futures
import contextlib
import datetime
import functools
import glob
import multiprocessing
import os
import shutil
import sys
import threading
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from check.clip_similarity import ClipImageSimilarity
from ldm.checkpoints import load_model_from_config, read_config
from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.data.images import list_images, load_rgb
from ldm.data.shapes.concept_sets import CONCEPT_SETS, set_names
from ldm.data.shapes.draw import CANVAS
from ldm.data.shapes.palette import COLOURS, SCENE_PHRASE, SCENES, SHAPES
from ldm.data.shapes.readers import read_attributes
from ldm.data.shapes.scores import evaluate_concept, evaluate_word, format_table, read_spec
from ldm.inference import SampleOptions, load_modules, modules_beside, sample_batch, to_uint8
from ldm.models.diffusion.sampling import SAMPLERS
from ldm.training import TrainOptions
from ldm.training import run as run_training
from ldm.util import atomic_write_text, require_finite, require_positive

MODEL_DIR = "models/ldm/tiny-shapes"
VARIANTS = "configs/ablations"
FINETUNE = "configs/tiny-shapes/finetune.yaml"
# model name -> (model folder, its default TI configs, merged in order)
MODELS = {"ldm": (MODEL_DIR, [FINETUNE]), "ar": ("models/ar/tiny-shapes", ["configs/ar-shapes/finetune.yaml"]),
          "ar-scales": ("models/ar/tiny-shapes-scales",
                        ["configs/ar-shapes/finetune.yaml", "configs/ar-shapes/finetune-scales.yaml"])}
V2 = "configs/improvement/v2.yaml"
# the issue targets per model: (fidelity at least, and at least this many times the baseline's; editability)
TARGETS = {"ldm": (0.6, 3.0, 0.5), "ar": (0.0, 2.0, None), "ar-scales": (0.0, 2.0, None)}


def train_concept(spec, weights, logdir, extra=(), overlays=(), model="ldm", seed=None):
    """A TI run (ldm.training: the default TI settings + `overlays` + key=value `extra`) on dataset/<concept>.

    With `seed` the run uses it (train_new.py's --seed) and its folder name ends in _seed<seed>.
    """
    model_dir, finetunes = MODELS[model]
    name = spec["name"] + (f"_seed{seed}" if seed is not None else "")
    options = TrainOptions(base=[f"{model_dir}/config.yaml", *finetunes, *overlays], train=True,
                           actual_resume=weights, name=name, data_root=os.path.join("dataset", spec["name"]),
                           init_word=spec["init_word"], placeholder_string="*", logdir=logdir)
    if seed is not None:
        options.seed = seed
    return run_training(options, list(extra))


def load_variant(name):
    """configs/ablations/<name>.yaml -> (overlay config paths, key=value overrides); None -> ([], [])."""
    if name is None:
        return [], []
    path = os.path.join(VARIANTS, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{VARIANTS}/*.yaml"))
        raise UsageError(f"no variant '{name}' ({path}): use one of {', '.join(known)}")
    spec = read_config(path)
    return list(spec.get("configs") or []), list(spec.get("overrides") or [])


def load_ti_model(model="ldm", weights=None, overrides=(), extra_configs=()):
    """The shipped `model` with its default TI configs, `extra_configs` and the `model.` entries of the key=value
    `overrides` merged in: the model settings the TI runs trained with (weights: the shipped ones by default)."""
    model_dir, finetunes = MODELS[model]
    model_overrides = OmegaConf.from_dotlist([o for o in overrides if o.startswith("model.")])
    configs = [f"{model_dir}/config.yaml", *finetunes, *extra_configs]
    config = OmegaConf.merge(*map(read_config, configs), model_overrides)
    return load_model_from_config(config, weights or f"{model_dir}/model.safetensors")


def make_sampler(model, steps, scale, seed, sampler="ddim"):
    """generate(prompt, n) -> list of uint8 (32, 32, 3), batched, seeded per prompt, through txt2img's code path.

    Diffusion models sample with `sampler` in `steps`; autoregressive ones sample every code (steps unused).
    """
    opt = SampleOptions(ddim_steps=steps, scale=scale, sampler=sampler, H=CANVAS, W=CANVAS)

    def generate(prompt, n):
        g = torch.Generator().manual_seed(seed)
        return to_uint8(sample_batch(model, [prompt] * n, opt, g))
    return generate


def in_korean(generate):
    """generate(prompt, n) that samples the Korean translation of each of the world's English prompts."""
    from improvement.v2.corpus import translate_prompt

    def korean(prompt, n):
        return generate(translate_prompt(prompt), n)
    return korean


def caption_following(generate, n):
    """Share of samples of "a photo of a {colour} {shape}" whose shape and colour both read back right."""
    rows = []
    for shape in SHAPES:
        for colour in COLOURS:
            reads = [read_attributes(img) for img in generate(f"a photo of a {colour} {shape}", n)]
            hit = sum(r["shape"] == shape and r["colour"] == colour for r in reads) / n
            rows.append({"caption": f"{colour} {shape}", "named_match": hit,
                         "shape": sum(r["shape"] == shape for r in reads) / n,
                         "colour": sum(r["colour"] == colour for r in reads) / n})
    return rows


def scene_following(generate, n):
    """Share of samples of "a photo of a {colour} {shape} in the {scene}" showing the scene's home value."""
    rows = []
    for k, (scene, (attribute, value)) in enumerate(SCENES.items()):
        shape, colour = SHAPES[k % len(SHAPES)], tuple(COLOURS)[k % len(COLOURS)]
        images = generate(f"a photo of a {colour} {shape} {SCENE_PHRASE.format(scene)}", n)
        hit = sum(read_attributes(img)[attribute] == value for img in images) / n
        rows.append({"scene": scene, "leans": f"{attribute} = {value}", "caption": f"{colour} {shape}",
                     "home_match": hit})
    return rows


def load_specs(names=None, concept_set="shipped"):
    """The concept.json of each dataset/<concept>/ named in `names` (default: those of `concept_set`, a key of
    ldm.data.shapes.concept_sets.CONCEPT_SETS), sorted by name.

    Each concept is read from its own folder (the one its runs train on); a concept.json there that names another
    concept (a copied folder) is refused rather than scored under the wrong name."""
    wanted = sorted(set(names if names is not None else set_names(concept_set)))
    paths = [os.path.join("dataset", n, "concept.json") for n in wanted]
    unknown = [n for n, path in zip(wanted, paths) if not os.path.isfile(path)]
    if unknown:
        present = sorted(os.path.basename(os.path.dirname(f)) for f in glob.glob("dataset/*/concept.json"))
        hint = (f"use one of {', '.join(present)}" if names is not None else
                "write them with python -m ldm.data.shapes.concept_sets dataset/")
        raise UsageError(f"no dataset/<concept>/concept.json for {', '.join(unknown)}: {hint}")
    specs = [read_spec(path) for path in paths]
    for name, spec in zip(wanted, specs):
        if spec["name"] != name:
            raise UsageError(f"dataset/{name}/concept.json names the concept {spec['name']!r}, not {name!r}: "
                             f"rename the folder to dataset/{spec['name']}/ or regenerate its concept.json")
    return specs


def check_edit_when(when, model="ldm"):
    """--edit_when: None, or a fraction in (0, 1) for a diffusion model."""
    if when is not None and not 0 < when < 1:
        raise UsageError(f"--edit_when {when:g}: give a fraction in (0, 1)")
    if when is not None and model != "ldm":
        raise UsageError(f"--edit_when with --model {model}: prompt edits need a diffusion model's timesteps; use "
                         "--model ldm or leave --edit_when out")


def scheduled_edits(spec, when):
    """The spec with each edit's word kept out of the steps before `when` (a prompt edit: "a photo of a [red
    :0.4]*"); unchanged for when = None."""
    if when is None:
        return spec
    edits = []
    for e in spec["edits"]:
        word = f"{e['value']} "
        if word not in e["prompt"]:
            raise UsageError(f"{spec['name']}: edit prompt {e['prompt']!r} does not hold its value {e['value']!r} "
                             "before a space, so --edit_when has no word to delay: score it without --edit_when")
        edits.append({**e, "prompt": e["prompt"].replace(word, f"[{e['value']} :{when:g}]", 1)})
    return {**spec, "edits": edits}


def embedding_path(folder, spec, seed):
    return os.path.join(folder, f"{spec['name']}_seed{seed}.pt")


def modules_path(folder, spec, seed):
    """Where the conditioner modules a variant trained beside an embedding are kept."""
    return os.path.join(folder, f"{spec['name']}_seed{seed}.modules.safetensors")


@contextlib.contextmanager
def modules_loaded(model, path):
    """`model` with the trained conditioner modules of `path` (None: as it is), its own weights back after."""
    if path is None:
        yield model
        return
    own = {k: v.clone() for k, v in model.state_dict().items()}
    load_modules(model, path)
    try:
        yield model
    finally:
        model.load_state_dict(own)


def required_modules(model, path, what, fix):
    """`path`, the modules file of a model that trains conditioner modules (None for one that trains none); a
    missing file (`path` None or absent, named `what`) is refused with `fix`, never scored without its modules."""
    if not getattr(model, "trainable_modules", None):
        return None
    if path is None or not os.path.isfile(path):
        raise UsageError(f"{what} is missing, but the model trains {', '.join(model.trainable_modules)}: {fix}")
    return path


def run_modules(model, folder, spec, seed):
    """The modules file of (spec, seed) for a model that trains modules (None otherwise); one is required then."""
    path = modules_path(folder, spec, seed)
    return required_modules(model, path, path, f"{embedding_path(folder, spec, seed)} was trained without them; "
                            "give --embeddings a folder of this variant's runs (or a new one)")


def _train_worker(spec, weights, logdir, extra, overlays, model, seed, threads=None):
    """One TI run (in this process, or in a pool worker with `threads` torch threads) -> its run folder."""
    if threads:
        torch.set_num_threads(threads)
    with torch.enable_grad():
        return train_concept(spec, weights, logdir, extra, overlays, model=model, seed=seed).logdir


def worker_pool(jobs):
    """A pool of `jobs` spawned worker processes that end when this process does, even when it is killed."""
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent):
    """Worker initializer: a daemon thread ends this worker once `parent` is gone (a killed command's TI runs
    would otherwise go on training, orphaned)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _finished_runs(calls, jobs):
    """Yield (index, run folder) of each _train_worker call as it finishes, `jobs` at a time."""
    if jobs == 1:
        for k, call in enumerate(calls):
            yield k, _train_worker(*call)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with worker_pool(jobs) as pool:
        runs = {pool.submit(_train_worker, *call, threads): k for k, call in enumerate(calls)}
        for run in concurrent.futures.as_completed(runs):
            yield runs[run], run.result()


def train_missing(specs, weights, args, overlays=(), overrides=()):
    """Train every (concept, seed) whose embedding file is missing; each is kept (with the modules a variant
    trained, first) as soon as its run ends."""
    todo = [(spec, seed) for spec in specs for seed in args.seeds
            if not os.path.exists(embedding_path(args.embeddings, spec, seed))]
    extra = [*overrides, *args.train_overrides]
    calls = [(spec, weights, args.logdir, extra, list(overlays), args.model, seed) for spec, seed in todo]
    for k, logdir in _finished_runs(calls, args.jobs):
        os.makedirs(args.embeddings, exist_ok=True)
        embedding = os.path.join(logdir, "checkpoints", "embeddings.pt")
        modules = modules_beside(embedding)
        if modules:
            shutil.copyfile(modules, modules_path(args.embeddings, *todo[k]))
        shutil.copyfile(embedding, embedding_path(args.embeddings, *todo[k]))


def seed_mean(scores):
    """The mean of evaluate_concept's "pseudo_word" scores over seeds, with each seed's fidelity/editability."""
    mean = {"word": scores[0]["word"], "by_seed": [(s["fidelity"], s["editability"]) for s in scores]}
    for key in ("fidelity", "editability", "image_similarity"):
        if key in scores[0]:
            mean[key] = float(np.mean([s[key] for s in scores]))
    mean["per_attribute"] = {a: float(np.mean([s["per_attribute"][a] for s in scores]))
                             for a in scores[0]["per_attribute"]}
    return mean


def concept_row(spec, scores, seeds, clip):
    """One table row of a concept's `*` (seed means) or baseline scores."""
    row = {"concept": spec["name"], "prompt word": scores["word"], "fidelity": scores["fidelity"],
           "editability": scores["editability"]}
    if len(seeds) > 1:
        by_seed = scores.get("by_seed")
        row["fidelity by seed"] = " / ".join(f"{f:.3f}" for f, _ in by_seed) if by_seed else "-"
        row["editability by seed"] = " / ".join(f"{e:.3f}" for _, e in by_seed) if by_seed else "-"
    row.update(scores["per_attribute"])
    if clip is not None:
        row["CLIP image sim"] = scores["image_similarity"]
    return row


def seed_row(spec, seed, scores):
    """One row of a single TI seed's `*` scores: fidelity, editability, each attribute's share, each edit's."""
    row = {"concept": spec["name"], "seed": seed, "fidelity": scores["fidelity"],
           "editability": scores["editability"], **scores["per_attribute"]}
    row["each edit"] = ", ".join(f"{prompt}: {share:.3f}" for prompt, share in scores["edits"].items())
    return row


def target_summary(pairs, model):
    """One line: how many concepts meet `model`'s targets (TARGETS); pairs: [(ti, baseline) scores]."""
    least, factor, edit_least = TARGETS[model]
    fid = sum(t["fidelity"] >= least and t["fidelity"] >= factor * b["fidelity"] and t["fidelity"] > 0
              for t, b in pairs)
    line = f"Targets: fidelity >= {least:g} and >= {factor:g}x the baseline on {fid} of {len(pairs)} concepts"
    if edit_least is not None:
        line += f", editability >= {edit_least:g} on {sum(t['editability'] >= edit_least for t, _ in pairs)}"
        line += f" of {len(pairs)}"
    means = (float(np.mean([t[k] for t, _ in pairs])) for k in ("fidelity", "editability"))
    return line + "; mean fidelity {:.3f}, mean editability {:.3f}.".format(*means)


def tables(args):
    """Train what is missing, then the markdown of every table `args` asks for."""

    specs = [scheduled_edits(spec, args.edit_when) for spec in load_specs(args.concepts, args.set)]
    model_dir, finetunes = MODELS[args.model]
    weights = args.weights or f"{model_dir}/model.safetensors"
    clip = ClipImageSimilarity(args.clip) if args.clip else None  # a wrong folder fails before any training
    overlays, overrides = load_variant(args.variant)
    train_missing(specs, weights, args, overlays, overrides)

    model = load_ti_model(args.model, weights, [*overrides, *args.train_overrides],
                          [*overlays, *([V2] if args.korean else [])])
    generate = make_sampler(model, args.ddim_steps, args.scale, args.seed, args.sampler)
    if args.korean:
        generate = in_korean(generate)
    language = ", Korean prompts through improvement v2" if args.korean else ""
    how = "every code sampled" if args.model != "ldm" else f"{args.sampler} {args.ddim_steps} steps"
    how += f", edit words from {args.edit_when:g} of the way" if args.edit_when is not None else ""
    variant = f"; TI variant {args.variant}" if args.variant else ""
    sections = [f"Measured {datetime.date.today()} on {weights}: n={args.n} per prompt, {how}, "
                f"guidance {args.scale}{language}{variant}."]
    if args.captions:
        manager, model.embedding_manager = model.embedding_manager, None
        rows = caption_following(generate, args.n)
        scenes = scene_following(generate, args.n)
        model.embedding_manager = manager
        sections.append("Caption following of the pretrained model:\n\n" + format_table(rows))
        sections.append("Scene words leaning their unnamed attribute (chance: 1/3 pattern and outline, "
                        "1/4 background):\n\n" + format_table(scenes))
    rows, pairs, seed_rows = [], [], []
    for spec in specs:
        image_score = None
        if clip is not None:
            references = [load_rgb(p) for p in list_images(os.path.join("dataset", spec["name"]))]
            image_score = clip.against(references)
        per_seed = []
        for k, seed in enumerate(args.seeds):
            model.embedding_manager.load(embedding_path(args.embeddings, spec, seed))
            with modules_loaded(model, run_modules(model, args.embeddings, spec, seed)):
                scores = evaluate_concept(generate, spec, n=args.n, baseline=False, image_score=image_score)
            if k == 0:  # the init word on the model as shipped: a variant's trained modules are not its baseline
                scores["init_word"] = evaluate_word(generate, spec, spec["init_word"], args.n, image_score)
            per_seed.append(scores)
            ti = per_seed[-1]["pseudo_word"]
            print(f"scored {spec['name']} seed {seed}: fidelity {ti['fidelity']:.3f}, editability "
                  f"{ti['editability']:.3f}", file=sys.stderr, flush=True)
        ti, baseline = seed_mean([r["pseudo_word"] for r in per_seed]), per_seed[0]["init_word"]
        rows += [concept_row(spec, ti, args.seeds, clip), concept_row(spec, baseline, args.seeds, clip)]
        pairs.append((ti, baseline))
        seed_rows += [seed_row(spec, seed, r["pseudo_word"]) for seed, r in zip(args.seeds, per_seed)]
    if rows:
        seeds = f" (means over TI seeds {', '.join(map(str, args.seeds))})" if len(args.seeds) > 1 else ""
        sections.append(f"Textual inversion (`*`) vs the init-word baseline{seeds}:\n\n" + format_table(rows))
        sections.append(target_summary(pairs, args.model))
    if len(args.seeds) > 1 and seed_rows:
        sections.append("Each TI seed (`*` samples' attribute shares, then each edit prompt's success):\n\n"
                        + format_table(seed_rows))
    return "\n\n".join(sections)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--concepts", nargs="*", default=None,
                   help="concept names of any dataset/<concept>/ (default: those of --set)")
    p.add_argument("--set", default="shipped", choices=sorted(CONCEPT_SETS),
                   help="the concept set scored without --concepts: shipped (the six kept out of pretraining), "
                        "tuning or heldout (ldm/data/shapes/concept_sets.py; docs/shapes-world.md#concept-sets)")
    p.add_argument("--embeddings", default=None,
                   help="folder of <concept>_seed<seed>.pt files "
                        "(default: outputs/concept_embeddings, _ar or _ar-scales for those models)")
    p.add_argument("--logdir", default="logs/concepts", help="parent folder of the TI runs")
    p.add_argument("--model", default="ldm", choices=sorted(MODELS),
                   help="ldm: the latent-diffusion tiny model; ar: the autoregressive one in raster order "
                        "(models/ar/tiny-shapes); ar-scales: the next-scale one (models/ar/tiny-shapes-scales)")
    p.add_argument("--weights", default=None,
                   help="weights of the model (e.g. a pretraining run's last.ckpt) for its config.yaml "
                        "(default: the shipped model.safetensors)")
    p.add_argument("--n", type=int, default=64, help="samples per prompt")
    p.add_argument("--ddim_steps", type=int, default=50, help="sampling steps (of any --sampler)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--edit_when", type=float, default=None, metavar="F",
                   help="write each edit prompt with its colour word added F of the way through sampling "
                        "(\"a photo of a [red :F]*\", docs/usage.md#editing-a-concept); default: plain prompts")
    p.add_argument("--captions", action="store_true",
                   help="also score caption and scene-word following of the base model")
    p.add_argument("--clip", default=None, metavar="DIR",
                   help="local CLIP model folder: adds the paper's image-image similarity (skipped without it)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="train and score with configs/ablations/NAME.yaml's overlays and overrides "
                        "(e.g. v1_both: improvement v1); default: the default TI settings")
    p.add_argument("--korean", action="store_true",
                   help="prompt in Korean through the v2 conditioner (configs/improvement/v2.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[23],
                   help="TI seeds: one TI run per concept and seed, scores averaged (default: train_new.py's 23)")
    p.add_argument("--jobs", type=int, default=1,
                   help="TI runs trained at a time, each in its own process with cores/jobs threads")
    p.add_argument("--out", default=None, help="write the tables (markdown) here too")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.add_argument("train_overrides", nargs="*", help="key=value overrides for the TI runs")
    args = p.parse_args(argv)
    args.embeddings = args.embeddings or "outputs/concept_embeddings" + (
        "" if args.model == "ldm" else f"_{args.model}")
    run_command(functools.partial(run, args), args.debug)


@torch.no_grad()
def run(args):
    """Check the flags, then print the tables (and write them to args.out)."""
    require_positive(n=args.n, ddim_steps=args.ddim_steps, jobs=args.jobs)
    require_finite(scale=args.scale)
    check_edit_when(args.edit_when, args.model)
    text = tables(args)
    print(text)
    if args.out:
        atomic_write_text(text + "\n", args.out)


if __name__ == "__main__":
    main()
