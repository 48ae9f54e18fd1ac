"""Sharding a benchmark (or a probe capture) over many processes, GPUs or SLURM jobs, and merging back.

``shard=i/n`` keeps the items at positions ``p`` with ``p % n == i`` of the full, ordered list: shards
are disjoint, cover everything, differ in size by at most one, and stay balanced across pair kinds
(a dataset's kinds are interleaved or in blocks; either way every shard gets its share of each).
A sharded benchmark job writes its own record folder ``<root>/<data>/<method>/shard-<i>-of-<n>/``
(concurrent shards never share a file); :func:`merge_runs` joins the folders of one (data, method)
back into one list of rows, refusing folders made with other settings.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from sdattn.errors import UserError

SHARD_KEY = "shard"  # the meta.json key that may differ between the shards of one run
PRESENTATION_KEYS = ("columns",)  # meta.json keys that say how rows are shown, not how they were made
SHARD_GLOB = "shard-*-of-*"
PLAN = "plan.json"  # per record folder: the pairs it is to hold (for the merge's accounting)
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_FOLDER = re.compile(r"^shard-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 ≤ index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def positions(self, n: int) -> range:
        """Positions (in the full list of ``n`` items) this shard owns."""
        return range(self.index, n, self.count)

    def select(self, items: list) -> list:
        return [items[p] for p in self.positions(len(items))]


def parse_shard(value, key: str = "shard") -> Shard | None:
    """``"i/n"`` → :class:`Shard`; None/empty → None (no sharding). A bad value is a :class:`UserError`."""
    if value is None or value == "":
        return None
    m = _SPEC.match(str(value))
    if m is None or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise UserError(f"{key}={value!r} is not a shard; allowed: i/n with n ≥ 1 and 0 ≤ i < n "
                        "(e.g. 0/8), or null for no sharding")
    return Shard(int(m[1]), int(m[2]))


def shard_of_folder(folder: str | Path) -> Shard | None:
    """The shard a record folder is named after (``shard-<i>-of-<n>``), None for an unsharded one."""
    m = _FOLDER.match(Path(folder).name)
    return Shard(int(m[1]), int(m[2])) if m else None


def shard_dataset(dataset, shard: Shard | None, seed: int):
    """The examples of ``dataset`` (a LoadedDataset) that ``shard`` owns, each with the seed it has in
    the single-process run (its own, else ``seed`` + its position in the FULL dataset), so every pair
    is edited exactly as without sharding."""
    if shard is None:
        return dataset
    examples = [ex if ex.seed is not None else dataclasses.replace(ex, seed=seed + p)
                for p, ex in zip(shard.positions(len(dataset.examples)), shard.select(dataset.examples))]
    images = {ex.image_path for ex in examples}
    return dataclasses.replace(dataset, examples=examples,
                               missing_images=[i for i in dataset.missing_images if i in images])


def record_folders(root: str | Path, rows_file: str) -> list[Path]:
    """Every record folder under ``root`` holding ``rows_file``: ``<data>/<method>/`` and its shard folders."""
    root = Path(root)
    return sorted(p.parent for p in [*root.glob(f"*/*/{rows_file}"), *root.glob(f"*/*/{SHARD_GLOB}/{rows_file}")])


def run_key(folder: Path, meta: dict) -> tuple[str, str]:
    """(data, method) of a record folder: from its meta, else from the folder names."""
    base = folder.parent if shard_of_folder(folder) else folder
    return str(meta.get("data", base.parent.name)), str(meta.get("method", base.name))


def settings(meta: dict) -> dict:
    """A meta without the shard key and the presentation: what must agree between the shards of one run."""
    return {k: v for k, v in identity(meta).items() if k != SHARD_KEY}


def identity(meta: dict) -> dict:
    """A meta without its presentation keys (the tables' column headers): what made the rows."""
    return {k: v for k, v in meta.items() if k not in PRESENTATION_KEYS}


def _natural(example_id) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(example_id))]


def merge_runs(runs: list[tuple[Path, dict, list[dict]]]) -> list[dict]:
    """Rows of the record folders ``[(folder, meta, rows)]`` of one (data, method), merged.

    One folder: its rows unchanged. Several (shards, or shards beside an unsharded run): their metas
    must agree except for the shard key (else one :class:`UserError` line naming the folders and keys);
    a pair in several folders counts once (an ok row wins over an error row); rows in id order
    (natural: ``x/2`` before ``x/10``), the dataset's order for its numbered ids."""
    if len(runs) == 1:
        return list(runs[0][2])
    first_dir, first_meta, _ = runs[0]
    for folder, meta, _ in runs[1:]:
        a, b = settings(first_meta), settings(meta)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise UserError(f"record folders {str(first_dir)!r} and {str(folder)!r} hold one (data, method) made "
                            f"with other settings ({', '.join(diff)}); delete the stale one or give another "
                            "benchmark.root")
    by_id: dict = {}
    for _, _, rows in runs:
        for r in rows:
            old = by_id.get(r["id"])
            if old is None or (old.get("status") != "ok" and r.get("status") == "ok"):
                by_id[r["id"]] = r
    return [by_id[i] for i in sorted(by_id, key=_natural)]
