"""The textual-inversion paper's evaluation (Gal et al., 2022, section 5) of every checkpoint of a run.

    python check/evaluate.py logs/<run> --clip path/to/clip-vit-base-patch32
    python check/evaluate.py emb.pt --config C.yaml [C2.yaml] --ckpt_path M --images dataset/x --clip DIR

Two axes, both measured with a local CLIP model (--clip; no hub is reached):
- image similarity (fidelity): the mean cosine between the CLIP image embeddings of the samples of "a photo of *"
  and of the concept's own images (--images; for a run folder, by default its training images);
- text similarity (editability): for each edit prompt ("a photo of * on the beach", ...), the mean cosine between
  the CLIP image embeddings of its samples and the CLIP text embedding of the prompt without the placeholder
  ("a photo of on the beach"), averaged over the prompts.
Where --images holds a concept.json of the shapes world (dataset/<concept>/), the attribute readers' fidelity and
editability of ldm.data.shapes.scores are added, on the same samples.

A run folder is evaluated at each embeddings_gs-<step>.pt and at its final embeddings.pt (where that differs from
every step's file), all from the same noise, so that the table and the plot show which step's embedding to keep.
Prints a markdown table and writes a plot of text similarity against image similarity, one point per checkpoint
(--out, default <run>/evaluation.png), with the table as a CSV beside it.
"""
import argparse
import csv
import functools
import glob
import io
import json
import logging
import os
import re
from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from check.clip_similarity import clip_pixels
from ldm.checkpoints import load_model_from_config, load_state_dict_into, read_config
from ldm.cli import UsageError, one_line, run_command
from ldm.config_check import TRUSTED_MODULES, untrusted_targets
from ldm.data.images import list_images, load_rgb
from ldm.data.shapes.scores import FIDELITY_PROMPT, evaluate_concept, format_table, read_spec
from ldm.models.diffusion.sampling import SAMPLERS, SPACINGS, sample_latents
from ldm.util import atomic_path, require_finite, require_positive

log = logging.getLogger("evaluate")

PLACEHOLDER = "*"
IMAGE_PROMPT = "a photo of *"
# Edit prompts in the style of the paper's: a new scene, a new style, a new material.
PAPER_PROMPTS = ["a photo of * on the beach", "a painting of *", "a photo of * in the snow",
                 "a pencil sketch of *", "a photo of * in the jungle"]
CLIP_FOLDERS = ("a folder saved with transformers' CLIPModel.save_pretrained (clip-vit-base-patch32 / "
                "clip-vit-large-patch14), with its tokenizer files, or an open_clip folder "
                "(open_clip_config.json + open_clip_pytorch_model.bin or .safetensors)")
PLOT_FORMATS = ("png", "pdf", "svg")
GS_FILE = re.compile(r"embeddings_gs-(\d+)\.pt")


# ---- CLIP -----------------------------------------------------------------------------------------------------

def center_square(image):
    """(H, W, 3) uint8 -> its central (S, S, 3) crop, S = min(H, W), as CLIP's preprocessing crops."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top:top + s, left:left + s]


class TransformersClip:
    """A transformers CLIPModel folder: embed_images(list of (H, W, 3) uint8) -> (N, D), embed_texts(list of N str)
    -> (N, D), both unit-norm in CLIP's joint space."""

    def __init__(self, path):
        from transformers import CLIPModel, CLIPTokenizer

        from ldm.modules.encoders.tokenizers import checked_size

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        text = self.model.config.text_config
        try:
            tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"--clip {path} has no CLIP tokenizer files (vocab.json, merges.txt; {one_line(e)}): "
                             "save the model's CLIPProcessor or CLIPTokenizer into the folder too") from e
        self.tokenizer = checked_size(tokenizer, path, text.vocab_size,
                                      "save the tokenizer of this CLIP model into the folder")
        self.size, self.max_length = self.model.config.vision_config.image_size, text.max_position_embeddings

    @torch.no_grad()
    def embed_images(self, images):
        x = torch.cat([clip_pixels([center_square(np.asarray(i))], self.size) for i in images])
        return F.normalize(self.model.get_image_features(pixel_values=x).pooler_output, dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts):
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(features.pooler_output, dim=-1)


class OpenClip:
    """An open_clip folder (open_clip_config.json and the weights), loaded through open_clip's local-dir schema;
    the same two methods as TransformersClip."""

    def __init__(self, path):
        if not any(glob.glob(os.path.join(path, f"*.{ext}")) for ext in ("safetensors", "bin", "pth")):
            raise UsageError(f"--clip {path} has open_clip_config.json but no weights (.safetensors, .bin or .pth): "
                             f"give {CLIP_FOLDERS}")
        try:
            import open_clip
        except ImportError as e:
            raise ImportError(f"--clip {path} is an open_clip folder but open_clip does not import here "
                              f"({one_line(e)}): install open-clip-torch with its requirements (torchvision), or "
                              "give a transformers CLIPModel folder") from e
        name = "local-dir:" + path
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)

    @torch.no_grad()
    def embed_images(self, images):
        from PIL import Image

        x = torch.stack([self.preprocess(Image.fromarray(np.asarray(i))) for i in images])
        return F.normalize(self.model.encode_image(x), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts):
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts))), dim=-1)


def is_transformers_clip(path):
    """Whether `path` holds a config.json of a full transformers CLIP model (both towers)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "clip"
    except (ValueError, AttributeError):
        return False


def clip_class(path):
    """--clip DIR -> TransformersClip or OpenClip, the class that loads it (nothing is loaded yet); no folder, or a
    folder of neither kind -> one line naming the folder to give."""
    if path is None:
        raise UsageError(f"--clip is required: give {CLIP_FOLDERS}; no hub is reached")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--clip {path} is not a folder: give {CLIP_FOLDERS}")
    if os.path.isfile(os.path.join(path, "open_clip_config.json")):
        return OpenClip
    if is_transformers_clip(path):
        return TransformersClip
    raise UsageError(f"--clip {path} is not a CLIP model folder (no config.json with model_type clip, no "
                     f"open_clip_config.json): give {CLIP_FOLDERS}")


def mean_cosine(a, b):
    """a: (N, D), b: (M, D) unit-norm -> the mean of all N x M cosines, a float in [-1, 1]."""
    return float((a @ b.T).mean())


def prompt_text(prompt):
    """An edit prompt as the paper compares it with CLIP: the placeholder left out ("a painting of *" ->
    "a painting of")."""
    return " ".join(prompt.replace(PLACEHOLDER, " ").split())


# ---- what to evaluate -----------------------------------------------------------------------------------------

def is_run_folder(path):
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "configs", "*-project.yaml")))


def run_config(run):
    """A run folder's latest configs/*-project.yaml -> DictConfig."""
    return read_config(sorted(glob.glob(os.path.join(run, "configs", "*-project.yaml")))[-1])


def run_checkpoints(run):
    """[(step label, embedding path)] of a run: each embeddings_gs-<step>.pt by step, then "final" for
    embeddings.pt unless it holds the same bytes as one of them; a run without any -> one line."""
    folder = os.path.join(run, "checkpoints")
    steps = sorted((int(m.group(1)), os.path.join(folder, m.group(0)))
                   for m in map(GS_FILE.fullmatch, os.listdir(folder) if os.path.isdir(folder) else ()) if m)
    found = [(str(step), path) for step, path in steps]
    final = os.path.join(folder, "embeddings.pt")
    if os.path.isfile(final) and not any(same_bytes(final, path) for _, path in found):
        found.append(("final", final))
    if not found:
        raise UsageError(f"{run} has no checkpoints/embeddings_gs-<step>.pt or embeddings.pt yet: train it first")
    return found


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def embedding_label(path):
    """The step of an embeddings_gs-<step>.pt, else "-"."""
    found = GS_FILE.fullmatch(os.path.basename(os.path.normpath(path)))
    return found.group(1) if found else "-"


def model_config(args, saved):
    """The merged --config files, else the run's saved config -> DictConfig with a model and its embedding
    manager; a run's model that names code outside the framework is refused unless --trust_configs."""
    if args.config:
        config = OmegaConf.merge(*map(read_config, args.config))
    elif saved is not None:
        config = saved
    else:
        raise UsageError(f"{args.input} is not a run folder (no configs/*-project.yaml): for an embedding file give "
                         "the model with --config and --ckpt_path")
    if "model" not in config or config.model.get("params", {}).get("personalization_config") is None:
        raise UsageError("the model config has no model.params.personalization_config (an embedding manager): add "
                         "the TI config the embedding was trained with to --config (e.g. a *-finetune.yaml)")
    outside = untrusted_targets(OmegaConf.to_container(config.model), TRUSTED_MODULES)
    if saved is not None and not args.config and outside and not args.trust_configs:
        raise UsageError(f"{args.input}'s saved config builds code outside this framework ({', '.join(outside)}); "
                         "configs are code: pass --trust_configs if you trust the run")
    return config


def weights_path(args, saved):
    """--ckpt_path, else the run's run.actual_resume; a missing file -> one line."""
    path = args.ckpt_path or (saved.get("run", {}).get("actual_resume") if saved is not None else None)
    if not path:
        raise UsageError("no model weights: give --ckpt_path (the run's config has no run.actual_resume)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model weights {path} not found: give the model's checkpoint with --ckpt_path")
    return path


def evaluation_plan(args):
    """-> (config, weights, [(label, embedding path)], reference image folder, plot path) of args.input."""
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"{args.input} not found: give a run folder (logs/<run>) or an embedding file")
    saved = run_config(args.input) if is_run_folder(args.input) else None
    config, weights = model_config(args, saved), weights_path(args, saved)
    if saved is not None:
        checkpoints = run_checkpoints(args.input)
        images = args.images or saved.get("run", {}).get("data_root")
        out = args.out or os.path.join(args.input, "evaluation.png")
    else:
        checkpoints = [(embedding_label(args.input), args.input)]
        images = args.images
        out = args.out or os.path.splitext(os.path.normpath(args.input))[0] + "_evaluation.png"
    if not images:
        raise UsageError("--images is required: give the folder of the concept's own images")
    return config, weights, checkpoints, images, out


def plot_format(path):
    """The plot's image format, from its suffix; another suffix -> one line."""
    fmt = os.path.splitext(path)[1][1:].lower()
    if fmt not in PLOT_FORMATS:
        raise UsageError(f"--out {path}: give a file name ending in .{', .'.join(PLOT_FORMATS)} for the plot")
    return fmt


def csv_path(plot):
    return os.path.splitext(plot)[0] + ".csv"


def refuse_existing(paths, overwrite):
    """Refuse to replace an existing file of `paths` unless overwrite."""
    for path in paths:
        if os.path.exists(path) and not overwrite:
            raise UsageError(f"{path} exists: pass --overwrite to replace it, or --out elsewhere")


def read_references(folder):
    """-> (list of (H, W, 3) uint8 images of folder, concept spec of its concept.json or None)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder} is not a folder: give the folder of the concept's own images")
    images = [load_rgb(p) for p in list_images(folder)]
    if not images:
        raise UsageError(f"--images {folder} holds no image: give the folder of the concept's own images")
    spec_file = os.path.join(folder, "concept.json")
    return images, read_spec(spec_file) if os.path.isfile(spec_file) else None


def evaluation_prompts(args, spec):
    """-> (fidelity prompt, edit prompts): the flags, else the concept's own (shapes world) or the paper's; every
    prompt must hold the placeholder."""
    image_prompt = args.image_prompt or (FIDELITY_PROMPT if spec else IMAGE_PROMPT)
    edits = args.prompts or [e["prompt"] for e in (spec or {}).get("edits", [])] or PAPER_PROMPTS
    for prompt in [image_prompt, *edits]:
        if PLACEHOLDER not in prompt:
            raise UsageError(f"prompt {prompt!r} has no {PLACEHOLDER}: write the placeholder where the concept goes")
    return image_prompt, edits


# ---- sampling -------------------------------------------------------------------------------------------------

def load_embedding(model, path):
    """Load an embedding file (and the trained conditioner modules saved beside it, if any) -> its placeholder."""
    model.embedding_manager.load(path)
    placeholders = list(model.embedding_manager.string_to_token_dict)
    if len(placeholders) != 1:
        raise UsageError(f"{path} holds {len(placeholders)} placeholders ({', '.join(placeholders)}): evaluate a "
                         "file with one concept")
    modules = modules_beside(path)
    if modules:
        load_state_dict_into(model, modules, strict=False)
    return placeholders[0]


def modules_beside(path):
    """checkpoints/modules<suffix>.safetensors beside checkpoints/embeddings<suffix>.pt, if it exists."""
    folder, stem = os.path.split(os.path.splitext(path)[0])
    if not stem.startswith("embeddings"):
        return None
    modules = os.path.join(folder, "modules" + stem[len("embeddings"):] + ".safetensors")
    return modules if os.path.isfile(modules) else None


def to_uint8(x):
    """x: (B, 3, H, W) in [-1, 1] -> list of B (H, W, 3) uint8."""
    return list(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def sample_images(model, captions, args, generator):
    """captions: list of B str -> (B, 3, H, W) in [-1, 1] at the model's own size."""
    if hasattr(model, "sample_images"):  # autoregressive: no diffusion sampler
        return model.sample_images(captions, scale=args.scale, generator=generator)
    shape = (len(captions), model.channels, model.image_size, model.image_size)
    z = sample_latents(model, captions, shape, steps=args.steps, scale=args.scale, eta=args.ddim_eta,
                       sampler=args.sampler, generator=generator, spacing=args.spacing)
    return model.decode_first_stage(z)


def make_generate(model, placeholder, args):
    """generate(prompt, n) -> n (H, W, 3) uint8 samples of `prompt` with `*` written as `placeholder`, in batches
    of --batch_size; each prompt's noise seeded with --seed (the same for every checkpoint), each prompt sampled
    once (later calls get the same images)."""
    memo = {}

    def generate(prompt, n):
        if (prompt, n) not in memo:
            generator = torch.Generator(args.device).manual_seed(args.seed)
            caption = prompt.replace(PLACEHOLDER, placeholder)
            images = []
            for start in range(0, n, args.batch_size):
                batch = [caption] * min(args.batch_size, n - start)
                images += to_uint8(sample_images(model, batch, args, generator))
            memo[prompt, n] = images
        return memo[prompt, n]
    return generate


# ---- scores ---------------------------------------------------------------------------------------------------

# What every checkpoint is scored against: the CLIP model, the (M, D) CLIP embeddings of the concept's images and
# the (P, D) ones of the edit prompts without the placeholder, the concept spec (shapes world) or None, the fidelity
# prompt and the P edit prompts.
Yardstick = namedtuple("Yardstick", "clip references texts spec image_prompt edits")


def make_yardstick(clip, references, spec, image_prompt, edits):
    """references: list of (H, W, 3) uint8 images of the concept -> Yardstick, embedded once."""
    return Yardstick(clip, clip.embed_images(references), clip.embed_texts([prompt_text(p) for p in edits]), spec,
                     image_prompt, edits)


def clip_scores(generate, yardstick, n):
    """-> {image_similarity, text_similarity} of the samples generate(prompt, n) gives."""
    embed = yardstick.clip.embed_images
    image = mean_cosine(embed(generate(yardstick.image_prompt, n)), yardstick.references)
    text = np.mean([mean_cosine(embed(generate(p, n)), yardstick.texts[k:k + 1])
                    for k, p in enumerate(yardstick.edits)])
    return {"image_similarity": image, "text_similarity": float(text)}


def checkpoint_row(model, label, path, yardstick, args):
    """One table row: the checkpoint's step label, file, CLIP scores and (shapes world) reader scores."""
    generate = make_generate(model, load_embedding(model, path), args)
    row = {"step": label, "embedding": os.path.basename(os.path.normpath(path)),
           **clip_scores(generate, yardstick, args.n)}
    if yardstick.spec is not None:
        scores = evaluate_concept(generate, yardstick.spec, n=args.n, baseline=False)["pseudo_word"]
        row.update(fidelity=scores["fidelity"], editability=scores["editability"])
    return row


# ---- outputs --------------------------------------------------------------------------------------------------

def csv_bytes(rows):
    """Rows (dicts with the first row's keys) -> CSV text, UTF-8."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def padded_limits(values, least=0.02):
    """Axis limits around `values` with a margin, at least `least` wide (checkpoints a hair apart stay readable)."""
    low, high = min(values), max(values)
    half = max((high - low) * 0.6, least / 2)
    middle = (low + high) / 2
    return middle - half, middle + half


def plot_bytes(rows, title, fmt):
    """Text similarity against image similarity, one labelled point per row, joined in row order -> image bytes
    in `fmt` (png, pdf, svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = [r["image_similarity"] for r in rows], [r["text_similarity"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(x, y, "-", color="0.75", zorder=1)
    ax.scatter(x, y, zorder=2)
    for row, xi, yi in zip(rows, x, y):
        ax.annotate(row["step"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(*padded_limits(x))
    ax.set_ylim(*padded_limits(y))
    ax.ticklabel_format(useOffset=False)
    ax.set_xlabel("image similarity (fidelity)")
    ax.set_ylabel("text similarity (editability)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=fmt)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def write_new(data, path, overwrite):
    """bytes -> path, atomically; an existing file (made meanwhile) is kept unless overwrite."""
    refuse_existing([path], overwrite)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


# ---- command --------------------------------------------------------------------------------------------------

def check_flags(args):
    """Refuse flag values the sampler cannot use, before anything is loaded."""
    require_positive(n=args.n, steps=args.steps, batch_size=args.batch_size)
    require_finite(scale=args.scale, ddim_eta=args.ddim_eta)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device} is not a device: use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here; use --device cpu")


@torch.no_grad()
def evaluate(args):
    """Score every checkpoint of args.input; print the table, write the plot and the CSV -> the rows."""
    check_flags(args)
    clip_loader = clip_class(args.clip)
    config, weights, checkpoints, images, out = evaluation_plan(args)
    fmt = plot_format(out)
    refuse_existing([out, csv_path(out)], args.overwrite)
    references, spec = read_references(images)
    prompts = evaluation_prompts(args, spec)
    yardstick = make_yardstick(clip_loader(args.clip), references, spec, *prompts)
    model = load_model_from_config(config, weights).to(args.device)
    rows = []
    for label, path in checkpoints:
        log.info("evaluating %s (%s)", label, path)
        rows.append(checkpoint_row(model, label, path, yardstick, args))
    print(format_table(rows))
    write_new(csv_bytes(rows), csv_path(out), args.overwrite)
    write_new(plot_bytes(rows, os.path.basename(os.path.normpath(args.input)), fmt), out, args.overwrite)
    print(f"plot: {out}\ncsv: {csv_path(out)}")
    return rows


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("input", metavar="RUN_OR_EMBEDDING",
                   help="a run folder (logs/<run>) or one embedding file (then --config and --ckpt_path)")
    p.add_argument("--images", default=None,
                   help="folder of the concept's own images (default for a run folder: its training images)")
    p.add_argument("--clip", default=None, metavar="DIR", help="local CLIP model folder (required): " + CLIP_FOLDERS)
    p.add_argument("--config", nargs="+", default=None,
                   help="model config(s), merged left to right (default for a run folder: its saved config)")
    p.add_argument("--ckpt_path", default=None,
                   help="model weights (default for a run folder: its run.actual_resume)")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="edit prompts with * for the concept (default: the concept.json's edits in --images, "
                        f"else {'; '.join(PAPER_PROMPTS)})")
    p.add_argument("--image_prompt", default=None,
                   help=f"prompt of the image similarity (default: '{FIDELITY_PROMPT}' where --images has a "
                        f"concept.json, else '{IMAGE_PROMPT}')")
    p.add_argument("--n", type=int, default=16, help="samples per prompt and checkpoint")
    p.add_argument("--batch_size", type=int, default=8, help="samples per sampler batch")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS),
                   help="dpmpp_2m: DPM-Solver++(2M), good in about 20 steps")
    p.add_argument("--spacing", default=None, choices=list(SPACINGS),
                   help="timestep grid (default: uniform for ddim and plms, logsnr for dpmpp_2m)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="0 is deterministic DDIM")
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=42, help="noise seed of every prompt, the same for each checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", default=None,
                   help="plot file (.png, .pdf or .svg; the CSV goes beside it) (default: <run>/evaluation.png, "
                        "or <embedding>_evaluation.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plot and CSV")
    p.add_argument("--trust_configs", action="store_true",
                   help="build a run folder's saved model config even where it names code outside this framework")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every default; a flag without one (None) says in its help
    what it falls back to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = get_parser().parse_args(argv)
    return run_command(functools.partial(evaluate, args), args.debug)


if __name__ == "__main__":
    main()
