"""How much a word in the caption lowers the frozen model's denoising loss on a concept's images, per timestep.

    python check/word_loss.py --concept striped_square --words library museum studio
    python check/word_loss.py --concept striped_square --words library museum --t 100 300 500 700 900 --noise 16

Each image of `dataset/<concept>/` is captioned "a photo of a {its colour word} {init word}", once without a
scene phrase and once "... in the {word}" per word, and the eps-MSE of the shipped tiny model is averaged over
`--noise` draws at each t (the same draws for every caption). A word whose attribute the images show should
lower the loss; where the right and a wrong word give the same loss, textual inversion's objective (the same
eps-MSE) cannot tell those values apart at that t. This is what `train_timesteps` in the TI config acts on.
"""
import functools
import os

import numpy as np
import torch

from check.concept_table import load_specs
from ldm.checkpoints import load_model_from_config, read_config
from ldm.cli import ArgumentParser, UsageError, run_command
from ldm.data.images import list_images, load_rgb, to_model_range
from ldm.data.personalized import _class_texts
from ldm.data.shapes.palette import SCENE_PHRASE
from ldm.data.shapes.world import CLASS_TEXTS
from ldm.util import require_positive

MODEL_DIR = "models/ldm/tiny-shapes"


def concept_latents(model, folder):
    """-> (z0: [N, C, h, w] posterior-mean latents of the folder's images, their colour words [N])."""
    paths = list_images(folder)
    x = torch.tensor(np.stack([to_model_range(load_rgb(p)) for p in paths])).permute(0, 3, 1, 2)
    return model.get_first_stage_encoding(model.encode_first_stage(x).mode()), _class_texts(CLASS_TEXTS, folder, paths)


@torch.no_grad()
def loss_by_t(model, z0, captions, ts, n_noise, seed=0):
    """The training loss's eps-MSE of `captions` on z0 at each t in ts, mean over n_noise seeded draws -> [len(ts)]."""
    c = model.get_learned_conditioning(captions)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in ts:
        tt = torch.full((z0.shape[0],), t, dtype=torch.long)
        draws = [torch.randn(z0.shape, generator=g) for _ in range(n_noise)]
        out.append(np.mean([model.p_losses(z0, c, tt, noise)[1]["loss_simple"].item() for noise in draws]))
    return np.array(out)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--concept", required=True, help="a folder name under dataset/")
    p.add_argument("--words", nargs="+", required=True, help="scene words to compare (ldm.data.shapes.palette.SCENES)")
    p.add_argument("--t", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    p.add_argument("--noise", type=int, default=8, help="noise draws per t")
    p.add_argument("--weights", default=f"{MODEL_DIR}/model.safetensors")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    run_command(functools.partial(compare_words, args), args.debug)


def check_timesteps(ts, model):
    """Refuse a --t the model has no noise level for."""
    bad = [t for t in ts if not 0 <= t < model.num_timesteps]
    if bad:
        raise UsageError(f"--t {bad[0]} is not a timestep of this model: give values in 0..{model.num_timesteps - 1}")


def compare_words(args):
    """Print the eps-MSE table of the captions without and with each scene word."""
    require_positive(noise=args.noise)
    init_word = load_specs([args.concept])[0]["init_word"]
    model = load_model_from_config(read_config(f"{MODEL_DIR}/config.yaml"), args.weights)
    check_timesteps(args.t, model)
    folder = os.path.join("dataset", args.concept)
    z0, colours = concept_latents(model, folder)
    print(f"eps-MSE x 1e3 on dataset/{args.concept} ({len(colours)} images), mean over {args.noise} noise draws")
    print("| caption ends | " + " | ".join(f"t={t}" for t in args.t) + " |")
    print("|---" * (len(args.t) + 1) + "|")
    for word in [None] + args.words:
        phrase = "" if word is None else " " + SCENE_PHRASE.format(word)
        captions = [f"a photo of a {c} {init_word}{phrase}" for c in colours]
        row = loss_by_t(model, z0, captions, args.t, args.noise)
        print(f"| {phrase.strip() or '(no scene)'} | " + " | ".join(f"{v * 1e3:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()
