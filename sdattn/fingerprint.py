"""Fingerprints of model weights: what a record of results can store to notice that a model was
retrained or replaced under the same name or path.

- A folder or file on disk (a diffusers folder, a single ``.safetensors`` / ``.ckpt`` checkpoint, a
  transformers folder): ``sha256:<hex>``, the SHA-256 over every file's relative path, size and own
  SHA-256 (contents streamed in chunks). Hidden entries (``.git``, ``.cache``) and the project's
  ``sdattn.yaml`` (its settings reach the results through the resolved config) are left out. A file's
  digest is kept per (path, size, mtime_ns, inode) for the life of the process, so SD 1.5 (~4 GB,
  a few seconds) is read once per process, and a rewritten file is read again.
- A hub id (loaded from the Hugging Face cache): ``hub:<id>@<commit>``, the cached revision (a commit
  names its files' contents).
- A model built in memory from settings and a seed: ``settings:<hex>``, the SHA-256 of the settings.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from .settings import SETTINGS_FILE

CHUNK_BYTES = 1 << 24  # 16 MiB read at a time
DIGEST_CACHE_SIZE = 1024  # file digests kept per process


@lru_cache(maxsize=DIGEST_CACHE_SIZE)
def _file_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:  # stat fields: a changed file is read again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's contents (hex), cached per (path, size, mtime_ns, inode) in this process."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256(str(p), st.st_size, st.st_mtime_ns, st.st_ino)


def model_files(path: str | Path) -> list[Path]:
    """The files whose contents make up the model at ``path`` (a file: itself; a folder: its files,
    recursively, without hidden entries and ``sdattn.yaml``), sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file() and f.name != SETTINGS_FILE
                  and not any(part.startswith(".") for part in f.relative_to(p).parts))


def path_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of the model file or folder at ``path`` (see the module docstring)."""
    p = Path(path).expanduser()
    h = hashlib.sha256()
    for f in model_files(p):
        name = f.name if f == p else f.relative_to(p).as_posix()
        h.update(f"{name}\0{f.stat().st_size}\0{file_sha256(f)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def hub_fingerprint(repo_id: str, index_file: str) -> str:
    """``hub:<id>@<commit>`` of the cached revision of ``repo_id`` that holds ``index_file`` (e.g.
    ``model_index.json``, ``config.json``); ``@uncached`` when the cache does not have it."""
    cached = try_to_load_from_cache(repo_id, index_file)
    commit = Path(cached).parent.name if isinstance(cached, str) else "uncached"
    return f"hub:{repo_id}@{commit}"


def source_fingerprint(name_or_path: str | Path, index_file: str = "config.json") -> str:
    """The fingerprint of the weights ``from_pretrained(name_or_path)`` loads: a path on disk (file or
    folder) by its contents, anything else as a hub id by its cached revision."""
    p = Path(str(name_or_path)).expanduser()
    return path_fingerprint(p) if p.exists() else hub_fingerprint(str(name_or_path), index_file)


def settings_fingerprint(settings: dict) -> str:
    """``settings:<hex>`` of a model built in memory: the SHA-256 of its settings (keys sorted)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return f"settings:{hashlib.sha256(text.encode()).hexdigest()}"

