"""Benchmark task (Tables 4–5): one method on one dataset, scored and timed per pair, then the tables
of everything under the benchmark root.

``python -m experiments.run experiment=table4 method=p2p data.path=/path/Car_fake_edit.json``
Multirun: ``python -m experiments.run -m experiment=table4 method=fpe,p2p,masactrl data.path=...``
(each job writes ``<root>/<data>/<method>/``; every job rewrites the tables from what is there).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from evaluation.datasets import load_from_config
from evaluation.methods import get_method
from evaluation.metrics import DEFAULT_CLIP_MODEL
from evaluation.runner import load_clip, run_pairs, write_tables
from experiments.common import load_model
from sdattn.errors import UserError


def _node(cfg: DictConfig, key: str) -> dict:
    value = cfg.get(key)
    return OmegaConf.to_container(value, resolve=True) if value is not None else {}


def run(cfg: DictConfig) -> dict:
    if not cfg.get("method"):
        raise UserError("method is required for task=benchmark: method=fpe|p2p|masactrl|sdedit_0.5|sdedit_0.75")
    if not cfg.get("data"):
        raise UserError("data is required for task=benchmark: e.g. data=car_fake_edit data.path=Car_fake_edit.json")
    method_cfg = cfg.method
    name = str(method_cfg.name)
    edit = get_method(name)  # unknown / not implemented → one-line error before any loading
    dataset = load_from_config(cfg.data)
    bench = _node(cfg, "benchmark")
    clip_name = str(_node(cfg, "metrics").get("clip") or DEFAULT_CLIP_MODEL)
    root = Path(bench.get("root") or Path(cfg.paths.log_dir) / "benchmark")
    out_dir = Path(bench.get("out_dir") or root / str(cfg.data.name) / name)

    clip = load_clip(clip_name, device=cfg.device)  # ModelLoadError (one line) when unavailable
    pipe = load_model(cfg)
    meta = {"method": name, "data": str(cfg.data.name), "clip": clip_name, "model": str(cfg.model.name),
            "model_path": cfg.model.get("path"), "dtype": str(cfg.dtype), "seed": int(cfg.seed),
            "method_cfg": OmegaConf.to_container(method_cfg, resolve=True)}
    summary = run_pairs(pipe, dataset, name, edit, method_cfg, out_dir, clip, meta, seed=int(cfg.seed),
                        progress=bool(cfg.progress))
    tables = write_tables(root, clip_name, str(cfg.model.name))
    print(dataset.summary())
    print(summary.line(name))
    shown = tables["table4"].get(str(cfg.data.name))
    if bench.get("table") == "table5" and tables["table5"] is not None:
        shown = tables["table5"]
    if shown is not None:
        table, files, cap = shown
        print(f"\n{cap}\n{table.to_markdown()}\n\ntables in {Path(files['md']).parent}")
    return {"summary": summary, "tables": tables, "out_dir": str(out_dir), "root": str(root),
            "dataset": dataset.summary()}
