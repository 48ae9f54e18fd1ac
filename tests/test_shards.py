"""Sharding a benchmark and a probe capture over several processes, and merging back: the merged tables
and features equal the single-process ones; the SLURM launcher config composes."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import experiments.tasks.benchmark as bench_task
import experiments.tasks.probe as probe_task
import probing.features as probe_features
from evaluation.datasets import EditExample, LoadedDataset
from evaluation.records import collect, read_pairs
from evaluation.shards import Shard, merge_runs, parse_shard, shard_dataset
from experiments.run import dispatch
from experiments.validate import validate
from probing.store import FeatureStore
from sdattn.errors import UserError

from .conftest import ROOT

SCORES = ["CLIP score ↑", "CLIP dir. sim. ↑", "PSNR ↑", "SSIM ↑", "Edit correct ↑", "Mask IoU ↑", "Pairs"]
BENCH = ["experiment=table4", "model=toy", "method=fpe", "data.limit=4", "model.steps=2", "logger=none"]
PROBE = ["probe=cross_attn", "probe.n_per_class=2", "probe.num_inference_steps=2", "probe.batch_size=40",
         "probe.layers=[3,14]", "trainer.max_epochs=1", "logger=none"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "SDATTN_VERBOSE": "0"}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


TIMING = ("time_s", "timed_at", "run_id")  # when and in which run a row was timed: differs between runs


def _rows_by_id(rows):
    return {r["id"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def test_shards_partition_the_dataset_balanced_with_the_full_run_seeds():
    kinds = ["fake_color", "fake_shape", "real_color", "real_shape"]
    examples = [EditExample(f"{k}_{i:03d}", "a", "b") for i in range(5) for k in kinds]  # kinds interleaved
    examples[3] = EditExample(examples[3].id, "a", "b", seed=77)  # an example with its own seed keeps it
    ds = LoadedDataset("d", examples)
    shards = [shard_dataset(ds, Shard(i, 3), seed=10) for i in range(3)]
    ids = [ex.id for s in shards for ex in s.examples]
    assert sorted(ids) == sorted(ex.id for ex in examples) and len(set(ids)) == len(ids)
    assert sorted(len(s.examples) for s in shards) == [6, 7, 7]
    for s in shards:  # every kind in every shard
        assert {ex.id.rsplit("_", 1)[0] for ex in s.examples} == set(kinds)
    seeds = {ex.id: ex.seed for s in shards for ex in s.examples}
    assert seeds == {ex.id: (77 if p == 3 else 10 + p) for p, ex in enumerate(examples)}
    assert shard_dataset(ds, None, 10) is ds


def test_merge_runs_joins_shards_once_per_pair_and_refuses_other_settings(tmp_path):
    meta = {"method": "fpe", "data": "d", "seed": 0}
    single = (tmp_path / "fpe", meta, [{"id": "d/2", "status": "ok"}, {"id": "d/10", "status": "ok"}])
    s0 = (tmp_path / "fpe/shard-0-of-2", {**meta, "shard": "0/2"},
          [{"id": "d/10", "status": "ok"}, {"id": "d/0", "status": "error", "error": "x"}])
    s1 = (tmp_path / "fpe/shard-1-of-2", {**meta, "shard": "1/2"}, [{"id": "d/0", "status": "ok"}])
    assert merge_runs([single]) == single[2]  # one folder: unchanged, in its own order
    merged = merge_runs([single, s0, s1])
    assert [(r["id"], r["status"]) for r in merged] == [("d/0", "ok"), ("d/2", "ok"), ("d/10", "ok")]
    with pytest.raises(UserError, match=r"shard-1-of-2.*other settings \(model, seed\)"):
        merge_runs([s0, (s1[0], {**s1[1], "seed": 1, "model": "m"}, s1[2])])


@pytest.mark.parametrize("value", ["2/2", "0/0", "1/2/3"])
def test_bad_shard_values_are_one_line_errors(value, compose_cfg):
    with pytest.raises(UserError, match=r"benchmark\.shard=.* is not a shard; allowed: i/n"):
        validate(compose_cfg("experiment=table4", f"benchmark.shard={value}"))
    with pytest.raises(UserError, match=r"probe\.shard=.* is not a shard"):
        validate(compose_cfg(f"probe.shard={value}"))
    assert parse_shard("3/8") == Shard(3, 8) and parse_shard(None) is None


def test_two_shards_merge_to_the_single_process_table(compose_cfg, toy_pipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_task, "load_model", lambda cfg: toy_pipe)
    single = dispatch(compose_cfg(*BENCH, f"paths.log_dir={tmp_path / 'single'}"))
    for i in range(2):
        res = dispatch(compose_cfg(*BENCH, f"paths.log_dir={tmp_path / 'sharded'}", f"benchmark.shard={i}/2"))
        assert res["out_dir"].endswith(f"toy_edit/fpe/shard-{i}-of-2")
        assert f"[toy_edit/fpe shard {i}/2] fpe: 2 pairs edited" in capsys.readouterr().out
    again = dispatch(compose_cfg(*BENCH, f"paths.log_dir={tmp_path / 'sharded'}", "benchmark.shard=0/2"))
    assert again["summary"].edited == [] and again["summary"].resumed == 2  # resume per shard
    t1 = single["tables"]["table4"]["toy_edit"][0]
    t2 = res["tables"]["table4"]["toy_edit"][0]  # the last shard's job rewrote the tables from both shards
    assert t2[SCORES].equals(t1[SCORES]) and t2.loc["fpe", "Pairs"] == "4"
    root = tmp_path / "sharded/benchmark/toy"
    clip = json.loads((root / "toy_edit/fpe/shard-0-of-2/meta.json").read_text())["clip"]
    merged = collect(root, clip)
    assert _rows_by_id(merged["toy_edit"]["fpe"]) == _rows_by_id(read_pairs(Path(single["out_dir"]) / "pairs.jsonl"))

    # experiment=merge: tables and accounting only, no model
    monkeypatch.setattr(bench_task, "load_model", lambda cfg: pytest.fail("merge loaded a model"))
    out = dispatch(compose_cfg("experiment=merge", "model=toy", f"paths.log_dir={tmp_path / 'sharded'}",
                               "benchmark.table=table4"))
    assert out["tables"]["table4"]["toy_edit"][0][SCORES].equals(t1[SCORES])
    prog = out["progress"]
    assert list(prog["shard"]) == ["0/2", "1/2"] and list(prog["done"]) == [2, 2] and list(prog["left"]) == [0, 0]
    assert out["gpu_seconds"].loc["fpe", "done"] == 4 and out["gpu_seconds"].loc["fpe", "GPU-s"] > 0
    assert "GPU-s" in capsys.readouterr().out

    # a shard made with other settings is refused, naming the folders and the key
    meta_path = root / "toy_edit/fpe/shard-1-of-2/meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "seed": 1}))
    with pytest.raises(UserError, match=r"shard-0-of-2.*shard-1-of-2.*other settings \(seed\)"):
        dispatch(compose_cfg("experiment=merge", "model=toy", f"paths.log_dir={tmp_path / 'sharded'}"))


@pytest.mark.slow
def test_two_shards_through_the_joblib_launcher_equal_one_process(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    common = [*BENCH, "threads=1", "progress=false"]
    r = _cli(*common, f"paths.log_dir={tmp_path / 'single'}")
    assert r.returncode == 0, r.stderr
    r = _cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *common, f"paths.log_dir={tmp_path / 'sharded'}",
             "benchmark.shard=0/2,1/2")
    assert r.returncode == 0, r.stderr
    r = _cli("experiment=merge", "model=toy", f"paths.log_dir={tmp_path / 'sharded'}")
    assert r.returncode == 0 and "| toy_edit | fpe      | 1/2     |" in r.stdout, r.stdout + r.stderr
    read = lambda d: (tmp_path / d / "benchmark/toy/toy_edit/table4.csv").read_text().splitlines()  # noqa: E731
    single, sharded = read("single"), read("sharded")
    header = single[0].split(",")
    keep = [i for i, h in enumerate(header) if not h.startswith("Time")]
    assert [[ln.split(",")[i] for i in keep] for ln in sharded] == [[ln.split(",")[i] for i in keep] for ln in single]


def test_two_capture_shards_fill_the_cache_of_one_run(compose_cfg, tiny_pipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe_task, "load_model", lambda cfg: tiny_pipe)
    single = tmp_path / "single"
    stores = {}
    real_store = probe_features.FeatureStore

    def store(root, config):  # remember each run's store
        stores[str(root)] = real_store(root, config)
        return stores[str(root)]

    monkeypatch.setattr(probe_features, "FeatureStore", store)
    dispatch(compose_cfg(*PROBE, f"paths.cache_dir={single}"))
    for i in range(2):
        res = dispatch(compose_cfg(*PROBE, f"paths.cache_dir={tmp_path / 'sharded'}", f"probe.shard={i}/2"))
        assert res["tables"] == {} and res["shard"] == f"{i}/2"  # capture only, no probes
    out = capsys.readouterr().out
    assert "probe capture shard 0/2: 10 of 10 prompts captured now, 0 already cached; 10 of 20 prompts" in out
    assert "probe capture shard 1/2: 10 of 10 prompts captured now, 0 already cached; 0 of 20 prompts" in out
    calls = []
    real_capture = probe_features.capture_features
    monkeypatch.setattr(probe_features, "capture_features", lambda *a, **k: (calls.append(1), real_capture(*a, **k))[1])
    res = dispatch(compose_cfg(*PROBE, f"paths.cache_dir={tmp_path / 'sharded'}"))
    assert calls == [] and res["tables"]  # every feature cached by the shards: probes trained, nothing captured
    one, two = stores[str(single / "features")], stores[str(tmp_path / "sharded" / "features")]
    assert one.dir.name == two.dir.name and len(two.manifest["shards"]) == 2
    ids = sorted(one.done_ids())
    a, b = one.load(ids), two.load(ids)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)  # other batches: float rounding only


def test_concurrent_writers_keep_every_shard_of_the_manifest(tmp_path):
    config = {"k": 1}
    errors = []

    def writer(w):
        try:
            store = FeatureStore(tmp_path, config)
            for j in range(15):
                store.add([f"{w}-{j}"], {"f": torch.full((1, 2), float(w * 100 + j))})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = FeatureStore(tmp_path, config)
    ids = [f"{w}-{j}" for w in range(4) for j in range(15)]
    assert store.missing(ids) == [] and len(store.manifest["shards"]) == 60
    assert store.load(ids)["f"][:, 0].tolist() == [float(w * 100 + j) for w in range(4) for j in range(15)]


def test_slurm_launcher_config_composes_with_the_submitit_parameters():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # (Hydra 1.3 renders one job's config: --cfg does not combine with -m; a sweep's jobs share it)
    r = _cli("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90",
             "experiment=table4", "benchmark.shard=0/8", "--cfg", "hydra", timeout=120)
    assert r.returncode == 0, r.stderr
    import yaml

    launcher = yaml.safe_load(r.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 90
    assert launcher["gpus_per_node"] == 1 and launcher["tasks_per_node"] == 1 and launcher["nodes"] == 1
    assert launcher["array_parallelism"] == 8 and launcher["mem_gb"] == 32 and launcher["cpus_per_task"] == 8
