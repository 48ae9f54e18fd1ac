"""The ``sdattn`` command (the console script of the installed package): the same as
``python -m experiments.run``. ``--help`` and shell completion (``-sc``) are answered without torch."""

from __future__ import annotations

import sys

from experiments.help import exit_if_help


def wants_completion(argv: list[str]) -> bool:
    return any(a in ("-sc", "--shell-completion") or a.startswith("--shell-completion=") for a in argv)


def main() -> None:
    exit_if_help(sys.argv[1:])
    if wants_completion(sys.argv[1:]):
        from experiments.completion import complete

        return complete()
    from experiments.run import cli

    cli()
