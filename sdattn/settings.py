"""Settings that come with a model's weights: sampling steps, guidance, layer presets, probe families,
example prompts and figure layers.

A model folder may ship ``sdattn.yaml`` (the toy model does); any other folder, file or hub model gets
the SD-1.x defaults. A preset (``model=...``) only says where the weights are, so ``model.path=<folder>``
can never run one model's settings on another's weights.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from .errors import UserError

SETTINGS_FILE = "sdattn.yaml"


def settings_file(path: str | Path | None) -> Path | None:
    """The settings file shipped with the weights at ``path`` (a folder, or a file's folder), if any."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    candidate = (p if p.is_dir() else p.parent) / SETTINGS_FILE
    return candidate if candidate.is_file() else None


@lru_cache(maxsize=16)
def _read(path: Path, mtime: float) -> dict:  # mtime: a changed file is read again
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"model settings {str(path)!r} are not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"model settings {str(path)!r} must be a mapping of setting: value")
    return data


def load_settings(path: str | Path | None, defaults: str | Path) -> dict:
    """``defaults`` (the SD-1.x settings) updated with the weights' own ``sdattn.yaml``.

    The result names its ``source`` (the file that decided) and a ``name``: the file's, else the
    folder's or file's stem, else ``defaults``'s.
    """
    settings = dict(_read(Path(defaults), Path(defaults).stat().st_mtime))
    own = settings_file(path)
    if own is not None:
        given = _read(own, own.stat().st_mtime)
        unknown = sorted(set(given) - set(settings) - {"name"})
        if unknown:
            raise UserError(f"model settings {str(own)!r} have unknown keys {unknown}; allowed: {sorted(settings)}")
        settings.update(given)
        settings["source"] = str(own)
    else:
        settings["source"] = f"SD-1.x defaults ({Path(defaults).name})"
        if path:
            p = Path(str(path))
            settings["name"] = p.name if p.is_dir() or not p.suffix else p.stem
    return settings
