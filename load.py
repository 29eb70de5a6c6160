"""Objects from dotted strings, and models from a config plus a checkpoint (the original's entry point; the code lives
in ldm.util and ldm.checkpoints)."""
from ldm.checkpoints import *  # noqa: F401,F403
from ldm.checkpoints import __all__  # noqa: F401
