"""A user's own configs, found by name without forking: ``--config-dir DIR`` (``DIR/<group>/<name>.yaml``
→ ``<group>=<name>``) or ``hydra.searchpath=[file://DIR, pkg://their.package]`` on the command line.
The command-line check composes with the same search path as Hydra's run (:func:`search_path_override`)."""

from __future__ import annotations

import os

from sdattn.errors import UserError

SEARCHPATH_KEY = "hydra.searchpath"


def search_path_override(config_dir: str | None, overrides: list[str]) -> list[str]:
    """``[hydra.searchpath=[...]]`` holding the command line's own ``hydra.searchpath`` entries and
    ``--config-dir`` (as Hydra adds it), or ``[]`` when there are none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries = []
    for o in OverridesParser.create().parse_overrides([o for o in overrides if o.startswith(SEARCHPATH_KEY + "=")]):
        entries += list(o.value())
    if config_dir is not None:
        path = os.path.abspath(config_dir)
        if not os.path.isdir(path):
            raise UserError(f"--config-dir {config_dir!r} is not a folder (it holds <group>/<name>.yaml files)")
        entries.append(f"file://{path}")
    quoted = ", ".join("'" + str(e).replace("\\", "\\\\").replace("'", "\\'") + "'" for e in entries)
    return [f"{SEARCHPATH_KEY}=[{quoted}]"] if entries else []
