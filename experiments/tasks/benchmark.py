"""Benchmark task (Tables 4–5): one method on one dataset, scored and timed per pair, then the tables
of everything under the benchmark root.

``python -m experiments.run experiment=table4 method=p2p data.path=/path/Car_fake_edit.json``
Multirun: ``python -m experiments.run -m experiment=table4 method=fpe,p2p,masactrl data.path=...``
(each job writes ``<root>/<data>/<method>/``; every job rewrites the tables from what is there).
Sharded: ``benchmark.shard=i/n`` edits only the pairs at positions ``p % n == i`` (seeds as without
sharding) into ``<root>/<data>/<method>/shard-<i>-of-<n>/``; the tables merge every shard
(:mod:`evaluation.shards`); ``experiment=merge`` only rebuilds them (:mod:`experiments.tasks.merge`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from editing.methods import build_method, method_settings
from evaluation.merge import shard_line, write_plan, write_tables_locked
from evaluation.metric_models import clip_fingerprint, load_clip
from evaluation.metrics import DEFAULT_CLIP_MODEL
from evaluation.reconstruction import ReconstructionCheck
from evaluation.records import collect
from evaluation.runner import run_pairs
from evaluation.scorers import build_metrics, metrics_columns, metrics_meta, scorer
from evaluation.shards import SHARD_KEY, parse_shard, shard_dataset
from evaluation.tables import COLUMNS, table_options
from experiments.common import load_data, load_model, model_fingerprint, plain, run_id
from experiments.tracking import log_benchmark
from sdattn.errors import UserError


def run(cfg: DictConfig) -> dict:
    if not cfg.get("method"):
        raise UserError("method is required for task=benchmark: method=<a config of configs/method/>, e.g. method=fpe")
    if not cfg.get("data"):
        raise UserError("data is required for task=benchmark: e.g. data=car_fake_edit data.path=Car_fake_edit.json")
    method_cfg = cfg.method
    name, edit = build_method(method_cfg)
    bench = (plain(cfg.get("benchmark")) or {})
    shard = parse_shard(bench.get("shard"), "benchmark.shard")
    dataset = shard_dataset(load_data(cfg.data), shard, int(cfg.seed))
    table_opts = table_options(bench.get("table"), (bench.get("table5") or {}).get("groups"),
                               bench.get("compare_paper", False))  # a bad Table 5 layout → one line now
    clip_name = str((plain(cfg.get("metrics")) or {}).get("clip") or DEFAULT_CLIP_MODEL)
    root = Path(bench.get("root") or Path(cfg.paths.log_dir) / "benchmark")
    out_dir = Path(bench.get("out_dir") or root / str(cfg.data.name) / name)
    out_dir = out_dir / shard.folder if shard else out_dir

    clip = load_clip(clip_name, device=cfg.device)  # ModelLoadError (one line) when unavailable
    metrics = build_metrics(cfg.get("metric"))  # the per-pair score plug-ins (configs/metric/), models loaded
    pipe = load_model(cfg)
    meta = {"method": name, "data": str(cfg.data.name), "clip": clip_name, "metrics": metrics_meta(metrics),
            "columns": metrics_columns(metrics), "model": str(cfg.model.name),
            "model_path": cfg.model.get("path"), "dtype": str(cfg.dtype), "seed": int(cfg.seed),
            "method_cfg": method_settings(plain(method_cfg)), "resize": str(cfg.resize),
            # the weights themselves: a model retrained or replaced under the same name or path is other settings
            "model_fingerprint": model_fingerprint(cfg, pipe), "clip_fingerprint": clip_fingerprint(clip_name)}
    if shard:
        meta[SHARD_KEY] = str(shard)
    write_plan(out_dir, dataset, shard)
    # Real pairs: how well the model reconstructs the input (reconstruction_psnr; a warning below the threshold).
    recon = ReconstructionCheck(pipe, str(cfg.resize), float(cfg.min_reconstruction_psnr), str(cfg.model.name))
    scorers = [scorer(m) for m in metrics] + [recon]
    summary = run_pairs(pipe, dataset, name, edit, out_dir, clip, meta, seed=int(cfg.seed), run_id=run_id(),
                        resize=str(cfg.resize), progress=bool(cfg.progress), scorers=scorers)
    tables = write_tables_locked(root, clip_name, str(cfg.model.name), **table_opts)
    scores = {**COLUMNS, **{c["key"]: c["header"] for c in metrics_columns(metrics)}}  # the runner's + plug-ins'
    log_benchmark(cfg, str(cfg.data.name), name, collect(root, clip_name).get(str(cfg.data.name), {}), scores,
                  out_dir, summary.edited, int(bench.get("panel_images", 8)))
    print(dataset.summary())
    print(shard_line(str(cfg.data.name), name, shard, summary.line(name)))
    if recon.warning():
        print(recon.warning())
    shown = tables["table4"].get(str(cfg.data.name))
    if bench.get("table") == "table5" and tables["table5"] is not None:
        shown = tables["table5"]
    if shown is not None:
        table, files, cap = shown
        print(f"\n{cap}\n{table.to_markdown()}\n\ntables in {Path(files['md']).parent}")
    if tables.get("paper") is not None:  # benchmark.compare_paper: the paper's table beside ours
        table, files, cap = tables["paper"]
        print(f"\n{cap}\n{table.to_markdown()}\n\n(in {files['md']})")
    return {"summary": summary, "tables": tables, "out_dir": str(out_dir), "root": str(root),
            "dataset": dataset.summary()}
