"""The ``sdattn`` command (the console script of the installed package): the same as
``python -m experiments.run``. ``--help`` is answered before Hydra and torch load."""

from __future__ import annotations

import sys

from experiments.help import exit_if_help


def main() -> None:
    exit_if_help(sys.argv[1:])
    from experiments.run import cli

    cli()
