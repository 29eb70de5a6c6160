"""Callbacks that write what a person looks at during training: image grids, the loss curve, step times."""
import logging
import os
import time

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
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
        with torch.no_grad(), seeded_generators(derived_seed("image_logger", split), devices):
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
            self._to_tensorboard(trainer, f"{split}/{key}", x, trainer.global_step)

    @staticmethod
    def _to_tensorboard(trainer, tag, x, step):
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image(tag, make_grid(x, nrow=4), step, dataformats="HWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")


class StepTimer(pl.Callback):
    """Logs `train/step_ms`: wall time of each training step (batch to optimizer step), image logs excluded
    when this callback comes before the ImageLogger."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        pl_module.log("train/step_ms", (time.perf_counter() - self.start) * 1000, on_step=True, batch_size=1)


class LossCurve(pl.Callback):
    """Keeps the training loss of every step and draws `loss.png` in the run folder."""

    def __init__(self, path, every_n_steps=100):
        super().__init__()
        self.path, self.every_n_steps = path, every_n_steps
        self.steps, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self.steps.append(trainer.global_step)
        self.losses.append(float(loss))
        if trainer.global_step % self.every_n_steps == 0:
            self.draw()

    def on_train_end(self, trainer, pl_module):
        self.draw()

    def state_dict(self):
        return {"steps": self.steps, "losses": self.losses}

    def load_state_dict(self, state):
        self.steps, self.losses = list(state["steps"]), list(state["losses"])

    @rank_zero_only
    def draw(self):
        if not self.losses:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.steps, self.losses, lw=0.6, alpha=0.4, label="loss")
        window = max(1, len(self.losses) // 20)
        smooth = np.convolve(self.losses, np.ones(window) / window, mode="valid")
        ax.plot(self.steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
        ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.legend(), fig.tight_layout()
        with atomic_path(self.path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
