"""The ``sdattn`` command (the console script of the installed package): the same as
``python -m experiments.run`` (plus ``sdattn app`` for ``task=app``). ``--help`` and shell completion (``-sc``)
are answered without torch."""

from __future__ import annotations

import sys

from experiments.help import exit_if_help


def wants_completion(argv: list[str]) -> bool:
    return any(a in ("-sc", "--shell-completion") or a.startswith("--shell-completion=") for a in argv)


def shorthand(argv: list[str]) -> list[str]:
    """``sdattn app [--share] [overrides]`` is ``sdattn task=app [app.share=true] [overrides]``."""
    if argv[:1] != ["app"]:
        return argv
    return ["task=app", *("app.share=true" if a == "--share" else a for a in argv[1:])]


def main() -> None:
    sys.argv[1:] = shorthand(sys.argv[1:])
    exit_if_help(sys.argv[1:])
    if wants_completion(sys.argv[1:]):
        from experiments.completion import complete

        return complete()
    from experiments.run import cli

    cli()
