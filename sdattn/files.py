"""Files of the project: where its shipped data are, and writing results atomically (a file is either its
old content or its complete new content, never torn: write a temporary sibling, then ``os.replace``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

DATA_PACKAGE = "sdattn_lab"  # installed from a wheel: configs/, datasets/, models/ are its package data


def data_root(code_root: Path) -> Path:
    """The folder holding ``configs/``, ``datasets/`` and ``models/``: the checkout ``code_root`` (the
    folder above this package) when it has them, else the installed package data beside it
    (``site-packages/sdattn_lab/``, mapped there by pyproject.toml)."""
    return code_root if (code_root / "configs").is_dir() else code_root / DATA_PACKAGE


# Read-only: what a run reads (configs, prompt families, shipped models). Runs write under the working
# folder (configs/paths/default.yaml), never here.
REPO_ROOT = data_root(Path(__file__).resolve().parents[1])


def atomic_save(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` writes the content to a temporary sibling of ``path`` (same suffix, so writers
    that infer the format from it work), which then replaces ``path``. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp{path.suffix}")  # per process: writers never share it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``path`` ← ``text`` (UTF-8), atomically."""
    return atomic_save(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
