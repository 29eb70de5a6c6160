"""Callbacks and helpers that draw what a person looks at: image grids of training batches, labelled validation
samples, and the images sent to the active loggers."""
import contextlib
import logging
import math
import os

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw
from pytorch_lightning.utilities import rank_zero_only

from ldm.rng import derived_seed, seeded_generators
from ldm.util import atomic_path

log = logging.getLogger(__name__)


def make_grid(images, nrow=None, padding=2):
    """images: (N, 3, H, W) in [0, 1] -> uint8 (H', W', 3) grid, `nrow` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i, img in enumerate(arr):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid


def save_png(array, path):
    """array: uint8 (H, W, 3) -> PNG at `path`, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def image_to_loggers(trainer, tag, grid, step):
    """grid: uint8 (H, W, 3) -> every active logger that takes images (TensorBoard, W&B, MLflow)."""
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "TensorBoardLogger":
            logger.experiment.add_image(tag, grid, step, dataformats="HWC")
        elif name == "WandbLogger":
            logger.log_image(key=tag, images=[grid], step=step)
        elif name == "MLFlowLogger":
            logger.experiment.log_image(logger.run_id, grid, f"{tag.replace('/', '_')}_{step:06}.png")


def labelled(images, labels, min_size=128):
    """images: (N, 3, h, w) in [0, 1], labels: N str -> (N, 3, H, W + caption) in [0, 1]: each image upscaled by an
    integer factor to at least `min_size` (nearest neighbour: tiny images stay sharp), its label written below."""
    factor = max(1, math.ceil(min_size / images.shape[-1]))
    big = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    out = []
    for image, label in zip(big, labels):
        canvas = Image.new("RGB", (image.shape[-1], image.shape[-2] + 14), "white")
        canvas.paste(Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
        ImageDraw.Draw(canvas).text((2, image.shape[-2] + 1), label, fill="black")
        out.append(torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def saved_vectors(pl_module):
    """A context within which a TI model samples with the vectors its run saves (their moving average, where it
    keeps one: embedding_ema); a no-op for other modules."""
    return getattr(pl_module, "averaged_vectors", contextlib.nullcontext)()


class ImageLogger(pl.Callback):
    """Every `batch_frequency` steps, saves `model.log_images(batch)` as grids under images/<split>/."""

    def __init__(self, batch_frequency, max_images, clamp=True, increase_log_steps=True, rescale=True,
                 disabled=False, log_on_batch_idx=False, log_first_step=False, log_images_kwargs=None):
        super().__init__()
        self.batch_freq, self.max_images = batch_frequency, max_images
        self.clamp, self.rescale, self.disabled = clamp, rescale, disabled
        self.log_first_step, self.log_on_batch_idx = log_first_step, log_on_batch_idx
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.log_steps = [2 ** n for n in range(int(np.log2(batch_frequency)) + 1)] if increase_log_steps else []

    def _due(self, step):
        if step in self.log_steps:
            self.log_steps.remove(step)
            return True
        return step % self.batch_freq == 0 and (step > 0 or self.log_first_step)

    @rank_zero_only
    def log_img(self, trainer, pl_module, batch, batch_idx, split="train"):
        step = batch_idx if self.log_on_batch_idx else trainer.global_step
        if self.disabled or not self._due(step) or not hasattr(pl_module, "log_images"):
            return
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        # a seed of its own: the grids of one run are drawn alike at every step, and logging them leaves the
        # training's random stream where it was (a resumed run, which logs no grid at its first step, stays exact)
        with torch.no_grad(), seeded_generators(derived_seed("image_logger", split), devices), saved_vectors(pl_module):
            images = pl_module.log_images(batch, N=self.max_images, **self.log_images_kwargs)
        pl_module.train(was_training)
        folder = os.path.join(trainer.logger.save_dir if trainer.logger else trainer.default_root_dir, "images", split)
        for key, x in images.items():
            x = x[: self.max_images].detach().float().cpu()
            if self.clamp:
                x = x.clamp(-1, 1)
            if self.rescale:
                x = (x + 1.0) / 2.0
            name = f"{key}_gs-{trainer.global_step:06}_e-{trainer.current_epoch:06}_b-{batch_idx:06}.png"
            save_png(make_grid(x, nrow=4), os.path.join(folder, name))
            image_to_loggers(trainer, f"{split}/{key}", make_grid(x, nrow=4), trainer.global_step)


    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")


class ValidationSampler(pl.Callback):
    """Samples `prompts` every `every_n_steps` steps and when training ends, `n` images a prompt, from fixed seeds
    (the same noise at every step, so the grids of a run compare), into `images/validation_gs-<step>.png` (one row
    a prompt, each image labelled with its prompt and the step) and to the active loggers."""

    def __init__(self, prompts, every_n_steps=250, n=4, steps=50, scale=5.0, min_size=128):
        super().__init__()
        self.prompts, self.every_n_steps, self.n = list(prompts), every_n_steps, n
        self.steps, self.scale, self.min_size = steps, scale, min_size
        self._done = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self._done != trainer.global_step:
            self.sample(trainer, pl_module)

    @rank_zero_only
    def sample(self, trainer, pl_module):
        was_training, step = pl_module.training, trainer.global_step
        pl_module.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        rows = []
        for i, prompt in enumerate(self.prompts):
            with torch.no_grad(), seeded_generators(derived_seed("validation", i), devices), saved_vectors(pl_module):
                x = pl_module.sample([prompt] * self.n, steps=self.steps, scale=self.scale)
            rows.append(labelled((x.float().cpu() + 1) / 2, [f"{prompt} | step {step}"] * self.n, self.min_size))
        pl_module.train(was_training)
        grid = make_grid(torch.cat(rows), nrow=self.n)
        save_png(grid, os.path.join(trainer.default_root_dir, "images", f"validation_gs-{step:06}.png"))
        image_to_loggers(trainer, "validation", grid, step)
        self._done = step
