"""The benchmark's record store: one folder per (dataset, method) run, safe to kill and resume.

    <dir>/meta.json            what produced the rows (a re-run with other settings is refused)
    <dir>/pairs.jsonl          one JSON line per pair, appended with flush + fsync
    <dir>/images/<id>.png      the edited image (+ <id>_source.png)

A killed run loses at most the pair in flight: a torn last line is dropped on read (and cut off before
the next append), and a re-run skips every pair already in ``pairs.jsonl``. One run at a time writes a
folder (``<dir>/.lock``, held for the whole run: a second job on the same folder is refused), and a
pair is never kept twice (the first record of an id wins on read; a repair drops the others).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from editing.grid import to_pil
from sdattn.errors import UserError
from sdattn.files import atomic_save, atomic_write_text

from .shards import identity, merge_runs, record_folders, run_key

META = "meta.json"
PAIRS = "pairs.jsonl"
LOCK = ".lock"


def first_per_id(rows: list[dict]) -> list[dict]:
    """``rows`` with one record per pair id: the first (a pair is scored once)."""
    seen, out = set(), []
    for r in rows:
        if r.get("id") not in seen:
            seen.add(r.get("id"))
            out.append(r)
    return out


def read_pairs(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a ``pairs.jsonl``, one per pair id (the first); a torn (unparseable) last line and
    repeated ids are ignored, and with ``repair`` the file is rewritten without them (atomically) so the
    next append starts on a clean line."""
    p = Path(path)
    if not p.is_file():
        return []
    text = p.read_text(encoding="utf-8")
    rows, good = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            continue
    unique = first_per_id(rows)
    lines = [json.dumps(r) for r in unique] if len(unique) < len(rows) else good
    clean = "".join(g + "\n" for g in lines)
    if repair and text != clean:
        atomic_write_text(p, clean)
    return unique


def read_meta(run_dir: str | Path) -> dict:
    """``meta.json`` of a run folder ({} when absent)."""
    path = Path(run_dir) / META
    return json.loads(path.read_text()) if path.is_file() else {}


class RecordStore:
    """The record folder of one (dataset, method) run: its meta, its per-pair records and images."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.meta_path = self.dir / META
        self.pairs_path = self.dir / PAIRS
        self.images_dir = self.dir / "images"

    @contextmanager
    def lock(self):
        """Hold the folder for one run; a folder another process holds is a one-line error."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.dir / LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"benchmark folder {str(self.dir)!r} is being written by another run; wait for it to "
                            "finish (a re-run then resumes) or give another benchmark.out_dir") from None
        try:
            yield self
        finally:
            lock.release()

    def open(self, meta: dict) -> dict[str, dict]:
        """Create the folder or check that it was made with ``meta``; → {id: record} already stored
        (a torn last line cut off)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        old = read_meta(self.dir)
        if old:
            a, b = identity(old), identity(meta)
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise UserError(f"benchmark.out_dir {str(self.dir)!r} holds rows made with other settings "
                                f"({', '.join(diff)}); give another benchmark.out_dir or delete that folder")
        if old != meta:  # new, or the same rows shown otherwise (a column renamed): the new presentation
            atomic_write_text(self.meta_path, json.dumps(meta, indent=1, sort_keys=True, default=str))
        return {r["id"]: r for r in self.records(repair=True)}

    def records(self, repair: bool = False) -> list[dict]:
        return read_pairs(self.pairs_path, repair=repair)

    def append(self, record: dict) -> None:
        """One record as one line, flushed and fsynced before returning."""
        with open(self.pairs_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_images(self, example_id: str, source: torch.Tensor, edited: torch.Tensor) -> None:
        """(1, 3, H, W) images in [0, 1] → ``images/<id>.png`` and ``images/<id>_source.png``, atomically."""
        for image, path in ((edited, self.images_dir / f"{example_id}.png"),
                            (source, self.images_dir / f"{example_id}_source.png")):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(path, lambda tmp, image=image: to_pil(image).save(tmp))


def collect_columns(root: str | Path) -> dict[str, dict]:
    """{record key: column spec} of the metric plug-ins of every record folder under ``root`` (their
    ``meta.json`` ``columns``: key, header, digits, why a value can be missing), in the order first seen."""
    columns: dict[str, dict] = {}
    for folder in record_folders(root, PAIRS):
        for spec in read_meta(folder).get("columns") or []:
            columns.setdefault(spec["key"], {k: v for k, v in spec.items() if k != "key"})
    return columns


def collect(root: str | Path, clip_name: str) -> dict[str, dict[str, list[dict]]]:
    """{dataset: {method: ok records}} of every ``<root>/<data>/<method>/`` scored with ``clip_name``; the
    shard folders ``<root>/<data>/<method>/shard-<i>-of-<n>/`` of one (data, method) are merged
    (:func:`evaluation.shards.merge_runs`: other settings between them are refused)."""
    runs: dict[tuple[str, str], list] = {}
    for folder in record_folders(root, PAIRS):
        meta = read_meta(folder)
        if meta.get("clip", clip_name) != clip_name:
            continue
        runs.setdefault(run_key(folder, meta), []).append((folder, meta, read_pairs(folder / PAIRS)))
    out: dict[str, dict[str, list[dict]]] = {}
    for (data, method), group in sorted(runs.items()):
        rows = [r for r in merge_runs(group) if r.get("status") == "ok"]
        if rows:
            out.setdefault(data, {})[method] = rows
    return out
