"""The image-logging callback of the original's command lines (the code lives in ldm.callbacks): configs that name
make_log_new.ImageLogger keep working."""
from ldm.callbacks.images import ImageLogger, ValidationSampler, make_grid, save_png  # noqa: F401
from ldm.callbacks.progress import LossCurve, RunProgress, StepTimer, VectorsMustMove, quiet_console  # noqa: F401
