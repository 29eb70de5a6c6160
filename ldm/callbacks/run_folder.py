"""Callbacks that own the run folder: its layout, the saved configs, checkpoints and embeddings.

Run folder (`logs/<data><time>_<name>/`):
    configs/<time>-project.yaml, configs/<time>-lightning.yaml   the merged config, resolved
    checkpoints/last.ckpt                                          resumable state (TI: embedding only)
    checkpoints/embeddings.pt, checkpoints/embeddings_gs-<N>.pt    learned vectors, original format
    checkpoints/modules.safetensors, modules_gs-<N>.safetensors    trained conditioner modules, if any
Every file is written atomically (temporary file + rename), and only by rank 0.
"""
import csv
import logging
import os
import signal
import time

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only
from safetensors.torch import save_file

from ldm.rng import random_states, set_random_states
from ldm.util import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


class SetupCallback(pl.Callback):
    """Creates the run folder and saves the project and lightning configs when training starts."""

    def __init__(self, resume, now, logdir, ckptdir, cfgdir, config, lightning_config):
        super().__init__()
        self.resume, self.now = resume, now
        self.logdir, self.ckptdir, self.cfgdir = logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    @rank_zero_only
    def setup(self, trainer, pl_module, stage=None):
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(folder, exist_ok=True)
        project = os.path.join(self.cfgdir, f"{self.now}-project.yaml")
        atomic_write_text(OmegaConf.to_yaml(self.config, resolve=True), project)
        lightning = OmegaConf.create({"lightning": self.lightning_config})
        atomic_write_text(OmegaConf.to_yaml(lightning, resolve=True),
                          os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))
        log.info("run folder: %s", self.logdir)


class ResumableCheckpoint(pl.Callback):
    """Writes `last.ckpt` every `every_n_train_steps` steps, every `every_n_minutes` minutes of training, when
    training ends and when a stop signal arrives (the run then ends after that step); always at the end of a step,
    so that the run resumed from it
    (-r) trains on exactly as the uninterrupted run would have: the checkpoint carries the optimizer, the data
    stream's position (the loader's state) and the global random generators as they were after the step.

    The file is written beside its name and then renamed over it: a kill or a full disk at any byte leaves the
    previous checkpoint in place. Every rank takes part in a save; rank 0 decides when (data parallelism).
    """

    def __init__(self, dirpath, every_n_train_steps=500, every_n_minutes=5.0, signals=None):
        super().__init__()
        self.dirpath, self.every_n_train_steps, self.every_n_minutes = dirpath, every_n_train_steps, every_n_minutes
        self.signals = signals
        self._states = self._resumed_states = None
        self._last_save, self._saved_step = time.monotonic(), 0

    @property
    def path(self):
        return os.path.join(self.dirpath, "last.ckpt")

    def state_dict(self):
        return {"random": self._states or random_states()}

    def load_state_dict(self, state):
        self._resumed_states = state["random"]

    def on_train_start(self, trainer, pl_module):
        if self._resumed_states is not None:  # after everything that set up the run
            set_random_states(self._resumed_states)
            self._resumed_states = None
        self._last_save, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._states = random_states()  # as they are between steps, whatever happens next
        step, stop = trainer.global_step, self.signals is not None and self.signals.received
        due = step % self.every_n_train_steps == 0 if self.every_n_train_steps else False
        late = self.every_n_minutes and time.monotonic() - self._last_save >= 60 * self.every_n_minutes
        save, stop = trainer.strategy.broadcast((bool(due or late or stop), stop), src=0)
        if save:
            self.save(trainer)
        if stop and not trainer.should_stop:  # Lightning logs this step, then ends the run
            trainer.should_stop = True
            log.warning("stopped by %s after step %d, its state saved in %s; resume with: python train_new.py -r %s -t",
                        signal.Signals(stop).name, step, self.path, os.path.dirname(self.dirpath))

    def on_train_end(self, trainer, pl_module):
        if self._saved_step != trainer.global_step:
            self.save(trainer)

    def save(self, trainer):
        partial = os.path.join(self.dirpath, ".last.ckpt.partial")
        try:
            trainer.save_checkpoint(partial, weights_only=False)  # every rank takes part, rank 0 writes
            if trainer.is_global_zero:
                with open(partial, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(partial, self.path)
            self._saved_step = trainer.global_step
        except OSError as e:
            e.filename = e.filename or partial  # a full disk is reported with the folder it filled
            raise
        finally:
            if trainer.is_global_zero and os.path.exists(partial):
                os.remove(partial)
        self._last_save = time.monotonic()

    def on_exception(self, trainer, pl_module, exception):
        """A crash or an abort: save the state of the last finished step (rank 0 alone: the others may be gone)."""
        if self._saved_step == trainer.global_step or not trainer.is_global_zero:
            return
        try:
            with atomic_path(self.path) as tmp:
                torch.save(trainer._checkpoint_connector.dump_checkpoint(), tmp)
        except OSError as e:
            log.warning("could not save %s after the run failed: %s", self.path, e)
            return
        log.warning("run stopped (%s) at step %d: %s saved; resume with -r", type(exception).__name__,
                    trainer.global_step, self.path)


class EmbeddingCheckpoint(pl.Callback):
    """Writes the learned vectors every `every_n_steps` steps, at the end, and when a run is interrupted.

    On an exception, Ctrl-C or SIGTERM it also writes `last.ckpt`, so the run can be resumed.
    """

    def __init__(self, ckptdir, every_n_steps=500):
        super().__init__()
        self.ckptdir, self.every_n_steps = ckptdir, every_n_steps

    @rank_zero_only
    def save(self, pl_module, step=None):
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is None:
            return
        names = [""] if step is None else ["", f"_gs-{step}"]
        modules = pl_module.trainable_module_state()
        with pl_module.averaged_vectors():  # the moving average where the run keeps one (embedding_ema)
            for suffix in names:
                manager.save(os.path.join(self.ckptdir, f"embeddings{suffix}.pt"))
                if modules:
                    with atomic_path(os.path.join(self.ckptdir, f"modules{suffix}.safetensors")) as tmp:
                        save_file({k: v.contiguous() for k, v in modules.items()}, tmp)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.save(pl_module, step)

    def on_train_end(self, trainer, pl_module):
        self.check_ranks_agree(trainer, pl_module)
        self.save(pl_module, trainer.global_step)

    @staticmethod
    def check_ranks_agree(trainer, pl_module):
        """Under DDP every rank must hold the same vectors; say so (or warn) once, from rank 0."""
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is None or trainer.world_size < 2:
            return
        flat = torch.cat([p.detach().flatten() for p in manager.embedding_parameters()])
        gathered = trainer.strategy.all_gather(flat)  # (world_size, n)
        diff = (gathered - gathered[0]).abs().max().item()
        if not trainer.is_global_zero:
            return
        if diff == 0:
            log.info("embedding identical on all %d ranks", trainer.world_size)
        else:
            log.warning("embedding differs between ranks (max abs diff %.3g)", diff)

    def on_exception(self, trainer, pl_module, exception):
        try:
            self.save(pl_module)
        except OSError as e:
            log.warning("could not save the embedding after the run stopped: %s", e)


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it continues `metrics.csv`: the rows of steps before `first_step` are
    kept (Lightning's own writer deletes the file), later ones (logged after the checkpoint a resumed run starts
    from) are dropped, so the file holds each step once."""

    def __init__(self, log_dir, first_step):
        self.first_step = first_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self):
        if not self._fs.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if int(float(row["step"])) < self.first_step]
            self.metrics_keys = list(reader.fieldnames or [])
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ContinuedCSVLogger(CSVLogger):
    """CSVLogger writing `metrics.csv` in `save_dir`, continued from step `first_step` (see _ContinuedWriter)."""

    def __init__(self, save_dir, first_step=0):
        super().__init__(save_dir=save_dir, name="", version="")
        self.first_step = first_step

    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.first_step)
        return self._experiment
