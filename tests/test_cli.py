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

    monkeypatch.setattr("probing.features.capture_features", fail)
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


# --------------------------------------------------------------------------- a CLI that explains itself
def test_help_lists_every_task_with_an_example_that_composes():
    import shlex

    from experiments.cli import check_command_line
    from experiments.help import TASKS, help_text

    modules = sorted(p.stem for p in (ROOT / "experiments" / "tasks").glob("*.py") if p.stem != "__init__")
    assert sorted(TASKS) == modules  # every task module has its entry (and no entry lacks a module)
    text = help_text()
    for task, (_what, example) in TASKS.items():
        assert f"  {task} " in text and example in text
        words = shlex.split(example)
        assert words[0] == "sdattn"
        check_command_line(words[1:])  # composes and validates
    for group in ("model=", "probe=", "edit=", "experiment=", "method=", "data=", "logger=", "hydra/launcher="):
        assert f"  {group}" in text
    assert "model_settings" not in text and "null_text" not in text and "_from_weights" not in text
    assert "./outputs/runs/" in text


def test_help_is_printed_before_torch_or_hydra_load():
    code = ("import sys\nsys.argv = ['sdattn', '--help']\nfrom experiments.console import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('loaded:', 'torch' in sys.modules, 'hydra' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "tasks" in r.stdout and r.stdout.rstrip().endswith("loaded: False False")
    r = subprocess.run([sys.executable, "-m", "experiments.run", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "tasks" in r.stdout and "Traceback" not in r.stderr


def test_missing_launcher_plugin_is_one_line_naming_the_extra(capsys):
    from experiments.launcher import installed
    from experiments.run import cli

    if installed("hydra_plugins.hydra_submitit_launcher"):
        pytest.skip("hydra-submitit-launcher is installed here")
    with pytest.raises(SystemExit) as e:
        cli(["-m", "hydra/launcher=submitit_slurm", "probe=cross_attn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: hydra/launcher=submitit_slurm") and "pip install 'sdattn-lab[cluster]'" in err[0]


def test_a_users_own_method_config_is_found_by_name(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from editing.methods import build_method
    from experiments.cli import CONFIG_DIR, check_command_line
    from sdattn.errors import UserError

    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "fpe_early.yaml").write_text("defaults: [fpe, _self_]\nname: fpe_early\n"
                                                         "self_replace_steps: 0.5\n")
    check_command_line(["--config-dir", str(tmp_path), "experiment=table4", "method=fpe_early"])
    check_command_line(["experiment=table4", "method=fpe_early", f"hydra.searchpath=[file://{tmp_path}]"])
    with pytest.raises(UserError, match="fpe_early"):  # without the folder: the error lists the options
        check_command_line(["experiment=table4", "method=fpe_erly", "--config-dir", str(tmp_path)])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("run", overrides=["experiment=table4", "method=fpe_early", f"hydra.searchpath=[file://{tmp_path}]",
                                        "paths.output_dir=x"])
    GlobalHydra.instance().clear()
    assert cfg.method.self_replace_steps == 0.5 and cfg.method.layers == cfg.model.fpe_layers
    assert build_method(cfg.method)[0] == "fpe_early"


@pytest.mark.parametrize("overrides,shown,hidden", [
    (["probe=self_attn", "probe.num_inference_steps=3", "probe.layers=[2,5]"],
     ["probe self_attn: model tiny", ": 3 steps", "probe.layers [2, 5]"], ["FPE", "50 steps"]),
    (["edit=fpe", "method.layers=2-5"], ["edit fpe: model tiny", "method.layers 2-5", "50 steps"], ["official"]),
    (["task=edit", "method=p2p"], ["edit p2p: model tiny", "50 steps"], ["layers"]),
    (["task=edit", "edit.methods=[fpe,pnp]"], ["edit fpe, pnp side by side: model tiny"], ["layers"]),
    (["experiment=table4", "method=fpe", "method.layers=4-14"],
     ["benchmark fpe on toy_edit", "method.layers 4-14"], []),
    (["experiment=merge"], ["merge: seed 0"], ["model"]),
])
def test_first_line_names_the_task_and_the_values_used(compose_cfg, overrides, shown, hidden):
    from experiments.cli import settings_line

    line = settings_line(compose_cfg(*overrides))
    assert all(s in line for s in shown) and not any(h in line for h in hidden), line
