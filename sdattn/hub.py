"""The Hugging Face Hub switch every loader honours, the one way metric models are loaded, and the check
that a loaded model got every weight from its files (never silently random ones)."""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import ModelLoadError, first_line

T = TypeVar("T")

PROJECT_DISTRIBUTION = "sdattn-lab"
EXAMPLES_SHOWN = 2  # weight names quoted in a loading error


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1 / on / yes / true, any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def declared_floor(package: str) -> str:
    """The version range this project declares for ``package`` (e.g. ``>=5.6``): from pyproject.toml in a
    checkout (current even before a re-install), else from the installed package's metadata."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    requires = re.findall(r'^\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.exists() else []
    if not requires:
        try:
            requires = importlib.metadata.requires(PROJECT_DISTRIBUTION) or []
        except importlib.metadata.PackageNotFoundError:
            requires = []
    for line in requires:  # e.g. 'transformers>=5.6' or 'pytest>=8; extra == "dev"'
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*([^;]*)(;.*)?$", line)
        if match and match.group(1).lower() == package.lower() and not match.group(3):
            return match.group(2).strip()
    return "the version pyproject.toml names"


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_loading_info(
    info: dict[str, Any], what: str, library: str, n_weights: int, ignore_unexpected: Sequence[str] = (),
) -> None:
    """Refuse a model whose weights were not all in its files: ``info`` is ``from_pretrained(...,
    output_loading_info=True)``'s report (transformers or diffusers). Missing or shape-mismatched weights
    would be newly initialised (random); unexpected ones mean the file's names do not fit the installed code.
    ``ignore_unexpected``: name prefixes the caller drops on purpose (e.g. a pooler it does not build)."""
    missing = list(info.get("missing_keys") or [])
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys") or []]
    unexpected = [k for k in info.get("unexpected_keys") or [] if not k.startswith(tuple(ignore_unexpected))]
    if not (missing or mismatched or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {n_weights} weights are not in its files and would be random "
                     f"(e.g. {', '.join(sorted(missing)[:EXAMPLES_SHOWN])})")
    if mismatched:
        parts.append(f"{len(mismatched)} have another shape in its files (e.g. {mismatched[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} weights in its files fit no parameter "
                     f"(e.g. {', '.join(sorted(unexpected)[:EXAMPLES_SHOWN])})")
    raise ModelLoadError(
        f"{what}: {'; '.join(parts)}: the files are incomplete or use another {library} key layout; upgrade {library} "
        f"to {declared_floor(library)} (installed {installed_version(library)}) or re-save the model with "
        f"save_pretrained from the installed version"
    )


def check_no_meta_weights(module: torch.nn.Module, what: str) -> None:
    """Refuse a model that diffusers built empty and did not fill completely (weights left on the meta device)."""
    empty = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if empty:
        raise ModelLoadError(
            f"{what}: {len(empty)} weights are not in the checkpoint (e.g. {', '.join(empty[:EXAMPLES_SHOWN])}): "
            f"the file is incomplete or of another architecture than model.config"
        )


def load_pretrained(
    load: Callable[[bool], tuple[T, dict]], name_or_path: str, what: str, contents: str,
    ignore_unexpected: Sequence[str] = (),
) -> T:
    """``load(local_files_only)`` for a hub id (the cache only when offline) or a local folder, returning the
    result and the model's loading info (``from_pretrained(..., output_loading_info=True)``). A failure, or a
    weight missing from the files, becomes one :class:`ModelLoadError` line naming ``what`` and how to get it
    (a folder with ``contents``)."""
    offline = hub_offline()
    try:
        result, info = load(offline or Path(str(name_or_path)).exists())
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:
        where = " offline (HF_HUB_OFFLINE=1)" if offline else ""
        raise ModelLoadError(
            f"{what} {str(name_or_path)!r} is not available{where}: download it once with "
            f"`huggingface-cli download {name_or_path}` or give a local folder with {contents} ({first_line(e)})"
        ) from e
    model = result[0] if isinstance(result, tuple) else result
    n_weights = len(model.state_dict())
    check_loading_info(info, f"{what} {str(name_or_path)!r}", "transformers", n_weights, ignore_unexpected)
    return result
