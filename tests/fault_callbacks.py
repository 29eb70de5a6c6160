"""Faults a test injects into a training run through its config (lightning.callbacks.<name>)."""
import errno
import os
import signal

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Sends `signum` (a name: SIGKILL, SIGTERM, SIGINT) to the run's own process after step `step`; with
    `during_save`, at the first checkpoint write after that step instead, between writing and renaming."""

    def __init__(self, step, signum="SIGKILL", during_save=False):
        self.step, self.signum, self.during_save = step, getattr(signal, signum), during_save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if not self.during_save:
            os.kill(os.getpid(), self.signum)
            return
        fsync = os.fsync

        def fsync_then_die(fd):
            fsync(fd)
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".last.ckpt"):
                os.kill(os.getpid(), self.signum)

        os.fsync = fsync_then_die


class DiskFullAt(pl.Callback):
    """From step `step` on, every file written to the disk fails as on a full disk (ENOSPC at its fsync)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device", os.readlink(f"/proc/self/fd/{fd}"))

        os.fsync = full
