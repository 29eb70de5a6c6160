"""The textual-inversion quality table of every shipped concept on the shipped tiny model.

    python check/concept_table.py                      # train missing embeddings, then score all
    python check/concept_table.py --captions           # also: does the pretrained model follow captions?
    python check/concept_table.py --captions --concepts   # only that (no concept, no TI)
    python check/concept_table.py --korean             # the same embeddings, prompted in Korean through v2
    python check/concept_table.py --model ar --embeddings outputs/ar_embeddings   # the autoregressive model
    python check/concept_table.py --model ar model.params.personalization_config.params.injection=output

For each `dataset/<concept>/` a TI embedding is trained with the default settings
(configs/tiny-shapes/finetune.yaml) unless `<embeddings>/<concept>.pt` exists, then n samples of
"a photo of a *" and of each edit prompt are read analytically (check/concept_eval.py), beside the
init-word baseline. Prints a markdown table; `--out` also writes it to a file. With `--korean` every
prompt is translated (improvement/v2/corpus.py) and conditions the model through the v2 conditioner
(configs/improvement/v2.yaml); the embeddings are the same English-trained files.
"""
import argparse
import datetime
import glob
import json
import os
import shutil
import sys

import torch
from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from check.clip_similarity import ClipImageSimilarity  # noqa: E402
from check.concept_eval import evaluate_concept, format_table  # noqa: E402
from ldm.data.images import list_images, load_rgb  # noqa: E402
from ldm.data.shapes_draw import CANVAS  # noqa: E402
from ldm.data.shapes_palette import COLOURS, SCENE_PHRASE, SCENES, SHAPES  # noqa: E402
from ldm.data.shapes_readers import read_attributes  # noqa: E402
from ldm.models.diffusion.sampling import SAMPLERS  # noqa: E402
from load import load_model_from_config  # noqa: E402

MODEL_DIR = "models/ldm/tiny-shapes"
FINETUNE = "configs/tiny-shapes/finetune.yaml"
MODELS = {"ldm": (MODEL_DIR, FINETUNE), "ar": ("models/ar/tiny-shapes", "configs/ar-shapes/finetune.yaml")}
V2 = "configs/improvement/v2.yaml"


def train_concept(spec, weights, logdir, extra=(), overlays=(), model="ldm"):
    """Run train_new.py's code path (default TI settings + `overlays` + key=value `extra`) on dataset/<concept>."""
    import train_new

    model_dir, finetune = MODELS[model]
    os.environ.pop("LDM_RUN_STAMP", None)
    return train_new.main(["--base", f"{model_dir}/config.yaml", finetune, *overlays, "-t", "--actual_resume",
                           weights, "-n", spec["name"], "--data_root", os.path.join("dataset", spec["name"]),
                           "--init_word", spec["init_word"], "--placeholder_string", "*", "-l", logdir, *extra])


def make_sampler(model, steps, scale, seed, sampler="ddim"):
    """generate(prompt, n) -> list of uint8 (32, 32, 3), batched, seeded per prompt, through txt2img's code path.

    Diffusion models sample with `sampler` in `steps`; autoregressive ones sample every code (steps unused).
    """
    import txt2img

    opt = txt2img.get_parser().parse_args(["--ddim_steps", str(steps), "--scale", str(scale), "--sampler", sampler,
                                           "--H", str(CANVAS), "--W", str(CANVAS)])

    def generate(prompt, n):
        g = torch.Generator().manual_seed(seed)
        return txt2img.to_uint8(txt2img.sample_batch(model, [prompt] * n, opt, g))
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


def load_specs(names=None):
    """The concept.json of every dataset/<concept>/ (or of `names`), sorted by name."""
    specs = [json.load(open(f)) for f in sorted(glob.glob("dataset/*/concept.json"))]
    unknown = set(names or ()) - {s["name"] for s in specs}
    if unknown:
        raise SystemExit(f"error: no dataset/<concept>/concept.json for {', '.join(sorted(unknown))}")
    return [s for s in specs if names is None or s["name"] in names]


def tables(args):
    """Train what is missing, then the markdown of every table `args` asks for."""

    specs = load_specs(args.concepts)
    model_dir, finetune = MODELS[args.model]
    weights = args.weights or f"{model_dir}/model.safetensors"
    for spec in specs:
        out = os.path.join(args.embeddings, f"{spec['name']}.pt")
        if not os.path.exists(out):
            with torch.enable_grad():
                run = train_concept(spec, weights, args.logdir, args.train_overrides, model=args.model)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copyfile(os.path.join(run.logdir, "checkpoints", "embeddings.pt"), out)

    configs = [f"{model_dir}/config.yaml", finetune] + ([V2] if args.korean else [])
    model_overrides = OmegaConf.from_dotlist([o for o in args.train_overrides if o.startswith("model.")])
    config = OmegaConf.merge(*map(OmegaConf.load, configs), model_overrides)  # the TI runs' model settings
    model = load_model_from_config(config, weights)
    generate = make_sampler(model, args.ddim_steps, args.scale, args.seed, args.sampler)
    if args.korean:
        generate = in_korean(generate)
    language = ", Korean prompts through improvement v2" if args.korean else ""
    how = "every code sampled" if args.model == "ar" else f"{args.sampler} {args.ddim_steps} steps"
    sections = [f"Measured {datetime.date.today()} on {model_dir}: n={args.n} per prompt, {how}, "
                f"guidance {args.scale}{language}."]
    if args.captions:
        manager, model.embedding_manager = model.embedding_manager, None
        rows = caption_following(generate, args.n)
        scenes = scene_following(generate, args.n)
        model.embedding_manager = manager
        sections.append("Caption following of the pretrained model:\n\n" + format_table(rows))
        sections.append("Scene words leaning their unnamed attribute (chance: 1/3 pattern and outline, "
                        "1/4 background):\n\n" + format_table(scenes))
    clip = ClipImageSimilarity(args.clip) if args.clip else None
    rows = []
    for spec in specs:
        model.embedding_manager.load(os.path.join(args.embeddings, f"{spec['name']}.pt"))
        image_score = None
        if clip is not None:
            references = [load_rgb(p) for p in list_images(os.path.join("dataset", spec["name"]))]
            image_score = clip.against(references)
        result = evaluate_concept(generate, spec, n=args.n, image_score=image_score)
        for key in ("pseudo_word", "init_word"):
            s = result[key]
            rows.append({"concept": spec["name"], "prompt word": s["word"], "fidelity": s["fidelity"],
                         "editability": s["editability"],
                         **{a: v for a, v in s["per_attribute"].items()},
                         **({"CLIP image sim": s["image_similarity"]} if clip is not None else {})})
    if rows:
        sections.append("Textual inversion (`*`) vs the init-word baseline:\n\n" + format_table(rows))
    return "\n\n".join(sections)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="*", default=None, help="concept names (default: all in dataset/)")
    p.add_argument("--embeddings", default=None,
                   help="folder of <concept>.pt files (default: outputs/concept_embeddings, _ar for --model ar)")
    p.add_argument("--logdir", default="logs/concepts", help="parent folder of the TI runs")
    p.add_argument("--model", default="ldm", choices=sorted(MODELS),
                   help="ldm: the latent-diffusion tiny model; ar: the autoregressive one (models/ar/tiny-shapes)")
    p.add_argument("--weights", default=None,
                   help="weights of the model (e.g. a pretraining run's last.ckpt) for its config.yaml "
                        "(default: the shipped model.safetensors)")
    p.add_argument("--n", type=int, default=64, help="samples per prompt")
    p.add_argument("--ddim_steps", type=int, default=50, help="sampling steps (of any --sampler)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", action="store_true",
                   help="also score caption and scene-word following of the base model")
    p.add_argument("--clip", default=None, metavar="DIR",
                   help="local CLIP model folder: adds the paper's image-image similarity (skipped without it)")
    p.add_argument("--korean", action="store_true",
                   help="prompt in Korean through the v2 conditioner (configs/improvement/v2.yaml)")
    p.add_argument("--out", default=None, help="write the tables (markdown) here too")
    p.add_argument("train_overrides", nargs="*", help="key=value overrides for the TI runs")
    args = p.parse_args(argv)
    args.embeddings = args.embeddings or "outputs/concept_embeddings" + ("_ar" if args.model == "ar" else "")
    with torch.no_grad():
        text = tables(args)
    print(text)
    if args.out:
        from ldm.util import atomic_write_text
        atomic_write_text(text + "\n", args.out)


if __name__ == "__main__":
    main()
