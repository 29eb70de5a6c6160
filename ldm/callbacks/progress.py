"""Callbacks that report a run as it goes: one progress display for the whole run, step times, the loss curve, the
guard that stops a run whose vectors do not learn; and the console kept to what a user can act on."""
import logging
import math
import sys
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from ldm.cli import UsageError
from ldm.util import atomic_path

log = logging.getLogger(__name__)


class RunProgress(pl.Callback):
    """One progress display for the whole run (step k of the run's total, its ETA, loss, lr, s/step): a bar on a
    terminal; elsewhere (a log file) a plain line every `every_n_seconds` seconds and at the end."""

    def __init__(self, every_n_seconds=30.0, stream=None):
        super().__init__()
        self.every_n_seconds, self.stream = every_n_seconds, stream or sys.stderr
        self.bar = None

    def on_train_start(self, trainer, pl_module):
        self.total, self.first = trainer.estimated_stepping_batches, trainer.global_step
        self.start = self.last_line = time.monotonic()
        if trainer.is_global_zero and self.stream.isatty():
            from tqdm import tqdm
            total = None if math.isinf(self.total) else int(self.total)
            self.bar = tqdm(total=total, initial=self.first, unit="step", dynamic_ncols=True, file=self.stream)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.is_global_zero:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss = float(loss) if loss is not None else float("nan")
        self.lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        if self.bar is not None:
            self.bar.update(trainer.global_step - self.bar.n)
            self.bar.set_postfix_str(
                f"loss {self.loss:.4f}  lr {self.lr:.2e}  {self.seconds_per_step(trainer):.2f} s/step")
        elif time.monotonic() - self.last_line >= self.every_n_seconds:
            self.line(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
        elif trainer.is_global_zero and trainer.global_step > self.first:
            self.line(trainer)

    def seconds_per_step(self, trainer):
        return (time.monotonic() - self.start) / max(1, trainer.global_step - self.first)

    def line(self, trainer):
        per_step, total = self.seconds_per_step(trainer), self.total
        eta = "" if math.isinf(total) else f"  eta {_duration(per_step * (total - trainer.global_step))}"
        of = "" if math.isinf(total) else f"/{int(total)}"
        print(f"step {trainer.global_step}{of}  loss {self.loss:.4f}  lr {self.lr:.2e}  {per_step:.2f} s/step{eta}",
              file=self.stream, flush=True)
        self.last_line = time.monotonic()


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02}m" if hours else f"{minutes}m{seconds:02}s"


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


class VectorsMustMove(pl.Callback):
    """Stops a TI run whose placeholder vectors are unchanged after its first `after_steps` steps (a zero gradient:
    nothing it could learn), with one line naming the likely causes."""

    def __init__(self, after_steps=20):
        super().__init__()
        self.after_steps = after_steps
        self.start = None

    def on_train_start(self, trainer, pl_module):
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is not None and any(p.requires_grad for p in manager.embedding_parameters()):
            self.start = (trainer.global_step, [p.detach().clone() for p in manager.embedding_parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is None or trainer.global_step != self.start[0] + self.after_steps:
            return
        now = pl_module.embedding_manager.embedding_parameters()
        if all(torch.equal(a, b.detach()) for a, b in zip(self.start[1], now)):
            placeholders = ", ".join(repr(s) for s in pl_module.embedding_manager.string_to_param_dict)
            raise UsageError(
                f"the placeholder vectors have not moved in {self.after_steps} steps (zero gradient): check that the "
                f"captions contain the placeholder {placeholders} (--placeholder_string, the dataset's templates), "
                "that the learning rate is not 0 (model.base_learning_rate) and that the vectors are trained "
                "(model.params.train_embedding, timestep bands the training timesteps reach)")
        self.start = None


def quiet_console():
    """Leave out what a user can neither act on nor needs: Lightning's adverts and three warnings, each with why."""
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    tips.addFilter(lambda record: not record.getMessage().startswith("\N{ELECTRIC LIGHT BULB} Tip"))  # adverts
    # a TI model keeps its frozen generator and encoders in eval mode on purpose (no dropout, fixed statistics)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # raised from inside Lightning's own code by its torch version check: nothing in a run can change it
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    # a run without a validation split has an empty validation loader: that is how it is meant
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
