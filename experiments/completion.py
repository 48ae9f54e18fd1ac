"""Shell completion of the ``sdattn`` command (Hydra's): ``eval "$(sdattn -sc install=bash)"`` once per
shell (or in ~/.bashrc); then TAB completes groups, options and keys, e.g. ``sdattn probe=<TAB>``.
Answered by a Hydra app that only loads the configs (no torch), so a TAB press stays fast."""

from __future__ import annotations

import hydra

from experiments.cli import register_resolvers
from experiments.help import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="run")
def _configs_only(cfg) -> None:  # Hydra answers -sc itself and never calls this
    raise SystemExit("sdattn: shell completion expected")


def complete() -> None:
    """Answer Hydra's ``-sc install=bash | uninstall=bash | query=bash`` from the command line."""
    register_resolvers()
    _configs_only()
