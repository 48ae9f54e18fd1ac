"""Files of the project: where the checkout is, and writing results atomically (a file is either its
old content or its complete new content, never torn: write a temporary sibling, then ``os.replace``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/, datasets/, models/


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
