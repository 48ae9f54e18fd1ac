"""``hydra/launcher=<name>`` without its plugin installed: one ``error:`` line naming the extra to install,
before Hydra composes anything (Hydra itself fails later with a traceback)."""

from __future__ import annotations

import importlib.util

from sdattn.errors import UserError

CLUSTER_EXTRA = "pip install 'sdattn-lab[cluster]'"
# launcher option → (the plugin's module, its distribution)
PLUGINS = {
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
}


def installed(module: str) -> bool:
    """Whether ``module`` (a plugin's) can be imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_launcher(overrides: list[str]) -> None:
    """Refuse ``hydra/launcher=<name>`` when ``name`` needs a plugin that is not installed."""
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == "hydra/launcher" and value in PLUGINS and not installed(PLUGINS[value][0]):
            raise UserError(f"hydra/launcher={value} needs the Hydra launcher plugin {PLUGINS[value][1]}, "
                            f"which is not installed: {CLUSTER_EXTRA}")
