"""Where a run reads and writes, checked before anything loads: every output folder writable, every
input file readable, and a run folder that no other run shares.

A run folder is claimed by creating its bookkeeping folder (``.hydra``, or a multirun's ``multirun.yaml``)
with an atomic, exclusive create: of two runs that would get the same folder (started in the same
second, or given the same ``hydra.run.dir``) the second gets ``<name>_2`` and says so.
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdattn.errors import UserError


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_writable(key: str, path) -> None:
    """The folder ``path`` (made if missing) can be written: one :class:`UserError` naming ``key`` and the
    path otherwise. Nothing is left behind (a probe file is made and removed in the folder, or in the
    closest existing ancestor when the folder does not exist yet)."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    base = nearest_existing(p)
    if not base.is_dir():
        where = "is a file" if base == p else f"is under the file {str(base)!r}"
        raise UserError(f"{key}={str(path)!r} {where}, not a folder; give a folder to write to")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".sdattn-write-check-")
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        if e.errno == errno.EROFS:
            why = "read-only file system"
        where = "" if base == p else f" (its closest existing folder {str(base)!r})"
        raise UserError(f"{key}={str(path)!r} is not writable{where}: {why}; give a folder you can write to") \
            from None
    os.close(fd)
    os.unlink(probe)


def check_readable(key: str, path) -> None:
    """An input file the run reads exists, is a file and can be opened."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise UserError(f"{key}={str(path)!r} does not exist")
    if p.is_dir():
        return  # a folder input (a model folder, a dataset root): its files are checked by their reader
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"{key}={str(path)!r} cannot be read: {os.strerror(e.errno) if e.errno else e}") from None


def claim_folder(path, marker: str) -> Path:
    """A folder at ``path`` that this process alone uses: the first of ``path``, ``path_2``, ``path_3``, ...
    whose ``marker`` (a bookkeeping file or folder inside it) this call creates exclusively."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
        candidate = path if i == 1 else path.with_name(f"{path.name}_{i}")
        candidate.mkdir(exist_ok=True)
        try:
            if marker.endswith((".yaml", ".json", ".log")):
                os.close(os.open(candidate / marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            else:
                (candidate / marker).mkdir()
        except FileExistsError:
            continue
        if i > 1:
            print(f"note: run folder {str(path)!r} is another run's; this run writes to {str(candidate)!r}",
                  file=sys.stderr)
        return candidate
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RunFolder:
    """The folder a run (``hydra.run.dir``) or a multirun (``hydra.sweep.dir``) will write to."""

    key: str
    path: Path
    explicit: bool  # given on the command line

    def claim(self) -> str:
        """Claim the folder (or a unique sibling) → the override that pins Hydra to it."""
        marker = ".hydra" if self.key == "hydra.run.dir" else "multirun.yaml"
        return f"{self.key}={hydra_value(claim_folder(self.path, marker))}"


def hydra_value(path) -> str:
    """``path`` as a quoted value of a Hydra command-line override (any character kept as it is)."""
    text = str(path).replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${")
    return f"'{text}'"
