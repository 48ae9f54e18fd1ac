"""Merge task: rebuild the benchmark tables from every record folder under ``benchmark.root`` (shards
of one (data, method) joined, see :mod:`evaluation.shards`) and print the accounting. No model, no
editing: ``python -m experiments.run experiment=merge [model=sd15] [benchmark.root=...]``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from evaluation.merge import gpu_seconds, progress, write_tables_locked
from evaluation.metrics import DEFAULT_CLIP_MODEL
from evaluation.tables import table_options
from experiments.common import plain
from sdattn.errors import UserError


def run(cfg: DictConfig) -> dict:
    bench = plain(cfg.get("benchmark")) or {}
    root = Path(bench.get("root") or Path(cfg.paths.log_dir) / "benchmark" / str(cfg.model.name))
    if not root.is_dir():
        raise UserError(f"benchmark.root {str(root)!r} does not exist: nothing to merge")
    clip_name = str((plain(cfg.get("metrics")) or {}).get("clip") or DEFAULT_CLIP_MODEL)
    options = table_options(bench.get("table"), (bench.get("table5") or {}).get("groups"),
                            bench.get("compare_paper", False))
    tables = write_tables_locked(root, clip_name, str(cfg.model.name), **options)
    folders = progress(root)
    per_method = gpu_seconds(folders)
    print(f"record folders under {root}:\n{folders.to_markdown(index=False)}\n")
    print(f"per method (all datasets and shards; GPU-s = sum of warm per-pair times, warm-ups and model "
          f"loading not counted):\n{per_method.to_markdown()}\n")
    if bench.get("table") == "table4" or tables["table5"] is None:
        shown = list(tables["table4"].values())
    else:
        shown = [tables["table5"]]
    for table, files, cap in shown:
        print(f"{cap}\n{table.to_markdown()}\n\ntables in {Path(files['md']).parent}\n")
    if tables.get("paper") is not None:
        table, files, cap = tables["paper"]
        print(f"{cap}\n{table.to_markdown()}\n")
    if not tables["table4"]:
        print(f"no rows scored with CLIP {clip_name!r} under {root}")
    return {"tables": tables, "progress": folders, "gpu_seconds": per_method, "root": str(root)}
