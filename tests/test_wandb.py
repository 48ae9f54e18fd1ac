"""What a W&B user finds in a run (experiments/tracking.py), read back from the offline run files:
the resolved config, the sweep's shared group, job type, name, tags, numeric metrics, images in the run folder."""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from experiments.run import dispatch

from .conftest import ROOT
from .wandb_runs import offline_runs

TINY_PROBE = ["model=tiny", "probe.n_per_class=2", "probe.test_fraction=0.5", "probe.num_inference_steps=1",
              "probe.layers=[3,14]", "trainer.max_epochs=1", "probe.control=false", "threads=1", "progress=false"]


def numeric(summary: dict, prefix: str) -> dict:
    return {k: v for k, v in summary.items() if k.startswith(prefix) and isinstance(v, (int, float))}


def test_offline_sweep_of_two_probe_jobs(tmp_path):
    """`-m probe=cross_attn,self_attn` from an empty folder: two offline runs in one group (the sweep
    folder, named after the task), each with the Hydra config, job type, name, tags and numbers."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # offline must be the default
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "experiments.run", "-m", "probe=cross_attn,self_attn", *TINY_PROBE],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1 and sweeps[0].name.endswith("_probe"), sweeps  # not "_None"
    runs = offline_runs(sweeps[0])
    assert len(runs) == 2
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert sorted(run["name"] for run in runs) == jobs
    assert {run["group"] for run in runs} == {sweeps[0].name}
    assert {run["config"]["probe"]["kind"] for run in runs} == {"cross", "self"}
    for run in runs:
        assert run["job_type"] == "probe" and {"tiny", "probe"} <= set(run["tags"])
        assert {"task", "seed", "model", "probe", "trainer", "paths", "logger"} <= set(run["config"])
        assert run["config"]["probe"]["num_inference_steps"] == 1 and run["config"]["model"]["name"] == "tiny"
        assert len(numeric(run["summary"], "accuracy/")) >= 3
        assert 0 <= run["summary"]["accuracy/overall/Avg"] <= 100
        by_layer = [h for h in run["history"] if "accuracy_by_layer/overall" in h]
        assert [h["layer"] for h in by_layer] == [3, 14]  # one point per layer on the `layer` axis
    out = r.stdout + r.stderr
    assert "probe cross_attn: model tiny" in out and "1 steps" in out and "FPE layers" not in out
    assert "anonymous" not in out and "FutureWarning" not in out


@pytest.fixture
def tiny_bench(tmp_path, compose_cfg, tiny_pipe, monkeypatch):
    import experiments.tasks.benchmark as task

    monkeypatch.setattr(task, "load_model", lambda cfg: tiny_pipe)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"id": f"p{i}", "source_prompt": "a photo of a red car",
                                 "target_prompt": "a photo of a blue car"} for i in range(2)]))
    return lambda *o: dispatch(compose_cfg("experiment=table4", "data=car_fake_edit", f"data.path={data}",
                                           "model.steps=2", "metrics.clip=tiny-random", "metrics.structure=tiny-random",
                                           f"paths.log_dir={tmp_path / 'logs'}", "logger=wandb", *o))


def test_benchmark_run_logs_method_scalars_and_images_in_its_folder(tiny_bench, tmp_path):
    tiny_bench("method=fpe")
    [run] = offline_runs(tmp_path / "out")
    s = run["summary"]
    for key in ("clip_score", "clip_directional", "structure", "time_s"):
        assert isinstance(s[f"benchmark/{key}"], (int, float)) and math.isfinite(s[f"benchmark/{key}"]), key
    assert s["benchmark/pairs"] == 2 and run["job_type"] == "benchmark" and run["config"]["method"]["name"] == "fpe"
    images = list((run["dir"] / "files" / "media").rglob("*.png"))
    assert len(images) == 4 and all((tmp_path / "out") in p.parents for p in images)  # 2 pairs × source, edited
    table = json.loads(next((run["dir"] / "files" / "media" / "table").rglob("table4/*.table.json")).read_text())
    assert "clip_score" in table["columns"] and all(isinstance(v, (int, float)) for v in table["data"][0][1:])


def test_claims_verdicts_and_numbers_are_scalars(compose_cfg, tmp_path):
    from evaluation.claims import Check, Claim, t_interval
    from experiments.tracking import log_claims

    cfg = compose_cfg("logger=wandb")
    good = Claim("a", "colour in the cross maps", [Check("cross", t_interval([0.8, 0.9, 0.85]), ">", 0.3)])
    skip = Claim("c", "edits", skip_reason="no checker")
    figure = tmp_path / "probe_layers.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(figure)
    log_claims(cfg, [good.to_dict(), skip.to_dict()], [figure])
    [run] = offline_runs(tmp_path / "out")
    s = run["summary"]
    assert s["claims/a/pass"] == 1 and s["claims/a/verdict"] == "PASS" and s["claims/c/verdict"] == "SKIP"
    assert "claims/c/pass" not in s and s["claims/passed"] == 1
    assert s["claims/a/check0/mean"] == pytest.approx(0.85) and s["claims/a/check0/threshold"] == 0.3
    assert list((run["dir"] / "files" / "media").rglob("*.png"))


def test_csv_logger_gets_config_and_scalars(compose_cfg, tmp_path):
    from experiments.tracking import log_results

    log_results(compose_cfg("logger=csv"), {"accuracy/overall/Avg": 42.0, "not a number": "x"})
    [metrics] = list((tmp_path / "out").rglob("metrics.csv"))
    assert "accuracy/overall/Avg" in metrics.read_text() and list((tmp_path / "out").rglob("hparams.yaml"))


def test_wandb_mode_is_honoured(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_cfg("logger=wandb").logger.mode == "disabled"
    assert compose_cfg("logger=wandb", "logger.mode=online").logger.mode == "online"


def test_sweep_file_runs_the_cli_with_valid_commands():
    """The W&B sweep's agent command is `sdattn key=value ...`; every combination it would run composes."""
    from experiments.cli import check_command_line

    sweep = yaml.safe_load((ROOT / "sweeps" / "probe_cross_vs_self.yaml").read_text())
    assert sweep["command"] == ["${env}", "sdattn", "${args_no_hyphens}"]
    params = {k: p["values"] if "values" in p else [p["value"]] for k, p in sweep["parameters"].items()}
    for combo in itertools.product(*params.values()):
        check_command_line([f"{k}={v}" for k, v in zip(params, combo)])
