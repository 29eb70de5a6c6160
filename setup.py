"""The run-folder callbacks of the original's layout (the code lives in ldm.callbacks.run_folder)."""
from ldm.callbacks.run_folder import ContinuedCSVLogger, EmbeddingCheckpoint, ResumableCheckpoint, SetupCallback  # noqa: F401
