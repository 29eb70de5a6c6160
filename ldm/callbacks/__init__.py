"""Lightning callbacks of a training run: its folder and checkpoints, its images, its progress."""
from ldm.callbacks.early_stop import FitPlateauStop, fit_loss
from ldm.callbacks.images import ImageLogger, ValidationSampler, image_to_loggers, labelled, make_grid, save_png
from ldm.callbacks.progress import LossCurve, RunProgress, StepTimer, VectorsMustMove, quiet_console
from ldm.callbacks.run_folder import ContinuedCSVLogger, EmbeddingCheckpoint, ResumableCheckpoint, SetupCallback

__all__ = ["FitPlateauStop", "fit_loss",
           "ImageLogger", "ValidationSampler", "image_to_loggers", "labelled", "make_grid", "save_png", "LossCurve",
           "RunProgress", "StepTimer", "VectorsMustMove", "quiet_console", "ContinuedCSVLogger",
           "EmbeddingCheckpoint", "ResumableCheckpoint", "SetupCallback"]
