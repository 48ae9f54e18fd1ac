"""Features on disk: safetensors shards plus a manifest, in a folder keyed by a config hash.

Each shard is written atomically (temp file + rename) before the manifest names it, so an
interrupted run loses at most the batch in flight and a re-run skips every finished sample.
Several processes may fill one store at once (``probe.shard=i/n`` capture jobs, or two runs of one
probe): every manifest update re-reads the manifest and writes it back while holding
``manifest.json.lock`` (a :class:`filelock.FileLock`), so no writer's shards are lost and no two writers
pick one shard name. :meth:`FeatureStore.fill` captures each batch of samples under a lock of its own
(``locks/<batch hash>.lock``): a batch another process is capturing is skipped, taken up after the free
ones and then found stored, so every sample is captured once and two jobs share the work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from sdattn.files import atomic_save, atomic_write_text


def config_hash(config: dict) -> str:
    """A short stable hash of a JSON-able config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureStore:
    """Per-sample feature rows under ``root/<hash>/``: ``manifest.json`` + ``shard-*.safetensors``."""

    def __init__(self, root: str | Path, config: dict):
        self.config = config
        self.dir = Path(root) / config_hash(config)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / "manifest.json"
        self.lock = FileLock(str(self.manifest_path) + ".lock")
        with self.lock:
            if self.manifest_path.exists():
                self.refresh()
            else:
                self.manifest = {"config": config, "shards": {}}
                atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1, default=str))

    def refresh(self) -> None:
        """Re-read the manifest (other processes may have added shards)."""
        self.manifest = json.loads(self.manifest_path.read_text())

    def done_ids(self) -> set[str]:
        self.refresh()
        return {i for ids in self.manifest["shards"].values() for i in ids}

    def missing(self, ids: Iterable[str]) -> list[str]:
        done = self.done_ids()
        return [i for i in ids if i not in done]

    def fill(self, batches: list[list[str]], capture: Callable[[list[str]], dict[str, torch.Tensor]]) -> int:
        """Store the features of every id of ``batches`` that is not stored yet, each captured once across
        processes: ``capture(ids)`` → one row per id, called for the missing ids of a batch while holding
        that batch's lock. Batches another process holds are done last (waiting for it; usually they are
        stored by then). Returns the number of ids captured by this call."""
        (self.dir / "locks").mkdir(exist_ok=True)
        pending, wait, captured = list(batches), 0, 0
        while pending:
            deferred = []
            for ids in pending:
                lock = FileLock(str(self.dir / "locks" / f"{config_hash(sorted(ids))}.lock"))
                try:
                    lock.acquire(timeout=wait)
                except Timeout:
                    deferred.append(ids)
                    continue
                try:
                    todo = self.missing(ids)
                    if todo:
                        self.add(todo, capture(todo))
                        captured += len(todo)
                finally:
                    lock.release()
            pending, wait = deferred, -1  # second pass: wait for the batches others hold
        return captured

    def add(self, ids: list[str], features: dict[str, torch.Tensor]) -> None:
        """Write one shard: ``features[name]`` has one row per id."""
        for name, t in features.items():
            if t.shape[0] != len(ids):
                raise ValueError(f"feature {name} has {t.shape[0]} rows for {len(ids)} ids")
        with self.lock:
            self.refresh()
            shard = f"shard-{len(self.manifest['shards']):06d}.safetensors"
            atomic_save(self.dir / shard,
                        lambda tmp: save_file({k: v.contiguous() for k, v in features.items()}, str(tmp)))
            self.manifest["shards"][shard] = list(ids)
            atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1, default=str))

    def load(self, ids: list[str]) -> dict[str, torch.Tensor]:
        """Rows for ``ids`` in that order, for every feature name."""
        rows: dict[str, dict[str, torch.Tensor]] = {}
        self.refresh()
        for shard, shard_ids in self.manifest["shards"].items():
            tensors = load_file(str(self.dir / shard))
            for name, t in tensors.items():
                for i, sid in enumerate(shard_ids):
                    rows.setdefault(name, {})[sid] = t[i]
        missing = [i for i in ids if any(i not in r for r in rows.values())] if rows else list(ids)
        if missing:
            raise KeyError(f"{len(missing)} samples have no stored features, e.g. {missing[0]!r}")
        return {name: torch.stack([r[i] for i in ids]) for name, r in rows.items()}
