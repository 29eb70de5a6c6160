"""Callbacks that own the run folder: its layout, the saved configs, checkpoints and embeddings.

Run folder (`logs/<data><time>_<name>/`):
    configs/<time>-project.yaml, configs/<time>-lightning.yaml   the merged config, resolved
    checkpoints/last.ckpt                                          resumable state (TI: embedding only)
    checkpoints/embeddings.pt, checkpoints/embeddings_gs-<N>.pt    learned vectors, original format
    checkpoints/modules.safetensors, modules_gs-<N>.safetensors    trained conditioner modules, if any
Every file is written atomically (temporary file + rename), and only by rank 0.
"""
import logging
import os

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from safetensors.torch import save_file

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
        atomic_write_text(OmegaConf.to_yaml(lightning, resolve=True), os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))
        log.info("run folder: %s", self.logdir)


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files appear whole or not at all."""

    def _save_checkpoint(self, trainer, filepath):
        partial = filepath + ".partial"
        super()._save_checkpoint(trainer, partial)  # every rank takes part, rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        self._last_checkpoint_saved = filepath


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
        self.save(pl_module)
        if trainer.is_global_zero and trainer.global_step > 0:
            # no barrier here: the other ranks may already be gone
            checkpoint = trainer._checkpoint_connector.dump_checkpoint()
            with atomic_path(os.path.join(self.ckptdir, "last.ckpt")) as tmp:
                torch.save(checkpoint, tmp)
            saved = "embedding and last.ckpt" if getattr(pl_module, "embedding_manager", None) else "last.ckpt"
            log.warning("run interrupted (%s): %s saved in %s; resume with -r", type(exception).__name__, saved,
                        self.ckptdir)
