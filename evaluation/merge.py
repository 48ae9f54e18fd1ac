"""The merge of a sharded benchmark: the tables of everything under a root (shards joined by
:func:`evaluation.records.collect`), written under a lock so that shards ending together do not race,
and the accounting of every record folder (pairs done / failed / skipped / left, GPU-seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from filelock import FileLock

from sdattn.files import atomic_write_text

from .records import PAIRS, read_meta, read_pairs
from .shards import PLAN, Shard, record_folders, run_key, shard_of_folder
from .tables import write_tables

TABLES_LOCK = ".tables.lock"  # in the benchmark root: one table writer at a time


def write_plan(out_dir: str | Path, dataset, shard: Shard | None) -> None:
    """``plan.json`` of a record folder: the pairs it is to hold and those skipped for a missing image."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"shard": None if shard is None else str(shard), "pairs": len(dataset.examples),
            "missing": dataset.missing_examples}
    atomic_write_text(out / PLAN, json.dumps(plan, indent=1))


def write_tables_locked(root: str | Path, clip_name: str, model_name: str = "", **options) -> dict:
    """:func:`evaluation.tables.write_tables` (``options``: its keyword arguments) while holding
    ``<root>/.tables.lock``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / TABLES_LOCK)):
        return write_tables(root, clip_name, model_name, **options)


def progress(root: str | Path) -> pd.DataFrame:
    """One row per record folder under ``root``: data, method, shard, planned pairs, done (ok rows),
    failed (error rows), skipped (missing images), left (not yet run), GPU-s (sum of per-pair warm times)."""
    rows = []
    for folder in record_folders(root, PAIRS):
        meta = read_meta(folder)
        data, method = run_key(folder, meta)
        records = read_pairs(folder / PAIRS)
        ok = [r for r in records if r.get("status") == "ok"]
        failed = sum(r.get("status") == "error" for r in records)
        plan_path = folder / PLAN
        plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
        shard = shard_of_folder(folder)
        planned, skipped = plan.get("pairs"), plan.get("missing", 0)
        rows.append({"data": data, "method": method, "shard": str(shard) if shard else "–",
                     "planned": planned, "done": len(ok), "failed": failed, "skipped": skipped,
                     "left": None if planned is None else max(planned - len(ok) - failed - skipped, 0),
                     "GPU-s": round(sum(float(r.get("time_s") or 0.0) for r in ok), 2)})
    return pd.DataFrame(rows, columns=["data", "method", "shard", "planned", "done", "failed", "skipped", "left",
                                       "GPU-s"])


def gpu_seconds(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: pairs done / failed / skipped / left and GPU-seconds, summed over datasets and shards."""
    cols = ["done", "failed", "skipped", "left", "GPU-s"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    return table.groupby("method")[cols].sum(min_count=1)


def shard_line(data: str, method: str, shard: Shard | None, summary_line: str) -> str:
    """The per-shard progress line a benchmark job prints at its end."""
    return f"[{data}/{method}" + (f" shard {shard}" if shard else "") + f"] {summary_line}"
