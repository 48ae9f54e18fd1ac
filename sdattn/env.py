"""The process defaults of the project's entry points (the CLI, the toy-world scripts, the tests):
the model hub offline unless the user asks (``HF_HUB_OFFLINE=0``), quiet transformers and W&B.
Called once at the top of an entry point, before the libraries read them."""

from __future__ import annotations

import os

DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "WANDB_SILENT": "true",
            "DIFFUSERS_VERBOSITY": "error"}  # diffusers: e.g. "float16 cannot run on cpu" (it can, slowly)


def set_process_defaults() -> None:
    """Set every variable of :data:`DEFAULTS` the environment does not already set."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
