"""The Hugging Face Hub switch every loader honours, and the one way metric models are loaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import ModelLoadError, first_line

T = TypeVar("T")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1 / on / yes / true, any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def load_pretrained(load: Callable[[bool], T], name_or_path: str, what: str, contents: str) -> T:
    """``load(local_files_only)`` for a hub id (the cache only when offline) or a local folder; a failure
    becomes one :class:`ModelLoadError` line naming ``what`` and how to get it (a folder with ``contents``)."""
    offline = hub_offline()
    try:
        return load(offline or Path(str(name_or_path)).exists())
    except (OSError, ValueError) as e:
        where = " offline (HF_HUB_OFFLINE=1)" if offline else ""
        raise ModelLoadError(
            f"{what} {str(name_or_path)!r} is not available{where}: download it once with "
            f"`huggingface-cli download {name_or_path}` or give a local folder with {contents} ({first_line(e)})"
        ) from e
