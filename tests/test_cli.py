"""Smoke runs of the probing experiments and the CLI's error path."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from experiments.run import dispatch

from .conftest import ROOT

FAST = ["probe.n_per_class=4", "probe.num_inference_steps=2", "probe.batch_size=40", "trainer.max_epochs=5",
        "probe.layers=[3,14]", "logger=none"]


@pytest.mark.parametrize("probe,stems", [
    ("cross_attn", ["cross_attn"]), ("self_attn", ["self_attn"]),
    ("cross_attn_tokens", ["cross_attn_tokens_a", "cross_attn_tokens_car"]),
])
def test_probe_tables(probe, stems, compose_cfg, tmp_path):
    cfg = compose_cfg(f"probe={probe}", *FAST)
    result = dispatch(cfg)
    assert sorted(result["tables"]) == stems
    for stem in stems:
        table = pd.read_csv(tmp_path / "out" / f"{stem}.csv", index_col=0)
        assert list(table.columns) == ["L3", "L14", "Avg"]
        assert list(table.index[:10]) == result["classes"] and "shuffled-label control" in table.index
        assert ((table.loc[result["classes"]] >= 0) & (table.loc[result["classes"]] <= 100)).all().all()
        assert (tmp_path / "out" / f"{stem}.tex").exists() and (tmp_path / "out" / f"{stem}.md").exists()


def test_rerun_reuses_cached_features(compose_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg("probe=cross_attn", *FAST)
    dispatch(cfg)
    import probing.capture

    def fail(*a, **k):
        raise AssertionError("features were generated again")

    monkeypatch.setattr("experiments.tasks.probe.capture_features", fail)
    assert "cross_attn" in dispatch(cfg)["tables"]
    assert probing.capture.capture_features is not fail


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["probe.layers=[3,40]"], "error: layer index 40 is out of range: this model has layers 1..16"),
    (["model=sd15"], "error: model 'runwayml/stable-diffusion-v1-5' or 'stable-diffusion-v1-5/stable-diffusion-v1-5"
                     "' is not available offline"),
    (["experiment=fig4_cross", "ablation.steps=1.5"], "error: ablation.steps=1.5 is outside [0, 1]"),
])
def test_cli_bad_input_is_one_line(args, message, tmp_path):
    r = _cli("model=tiny", *args, f"hydra.run.dir={tmp_path}", "logger=none", "probe.n_per_class=2")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
