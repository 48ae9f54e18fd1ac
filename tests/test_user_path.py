"""The real user's path: settings follow the weights, every experiment runs on the default model,
bad input is one line with exit 2 before anything runs, and run folders can be found."""

import os
import subprocess
import sys

import pytest
import torch

from experiments.cli import check_command_line
from experiments.run import dispatch
from sdattn.errors import UserError

from .conftest import ROOT


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """An SD-1.x-topology diffusers folder with no sdattn.yaml (what a user's checkpoint looks like)."""
    from sdattn.models import build_tiny_pipeline

    path = tmp_path_factory.mktemp("weights") / "my-sd-model"
    build_tiny_pipeline(ROOT / "datasets" / "tiny_vocab.txt", seed=0).save_pretrained(path)
    return path


def test_settings_come_with_the_weights(compose_cfg, sd_folder):
    toy = compose_cfg("model=toy", "edit=fpe")
    assert (toy.model.name, toy.model.steps, toy.model.guidance_scale, toy.method.layers) == ("toy", 25, 2.0, "all")
    assert toy.model.settings.source.endswith("models/toy/sdattn.yaml")
    # the default preset (toy) with another model's folder: that folder's settings, never the toy's
    other = compose_cfg("model=toy", "edit=fpe", f"model.path={sd_folder}")
    assert (other.model.name, other.method.num_inference_steps, other.method.guidance_scale, other.method.layers) == \
        ("my-sd-model", 50, 7.5, "official")
    assert other.model.clip == "openai/clip-vit-large-patch14" and other.model.families.color == "color_car"
    local = compose_cfg("model=local", "edit=fpe", f"model.path={sd_folder}")
    assert local.method == other.method and local.model.name == "my-sd-model"
    # an explicit override wins; the toy folder loaded through model=local gets the toy's settings
    assert compose_cfg("model=toy", "model.steps=30", f"model.path={sd_folder}").model.steps == 30
    assert compose_cfg("model=local", f"model.path={ROOT / 'models' / 'toy'}").model.steps == 25


@pytest.mark.parametrize("probe", ["cross_attn", "self_attn", "cross_attn_tokens", "cross_attn_animal"])
def test_toy_probe_tables_have_twenty_test_images_per_class(probe, compose_cfg, sd_folder):
    """Per-class accuracies in 5 % steps on the default model; SD-1.x keeps its own (cheaper) split."""
    def test_images(cfg):  # as probing.prompts.build_prompts splits
        return max(1, round(cfg.probe.n_per_class * cfg.probe.test_fraction))

    assert test_images(compose_cfg("model=toy", f"probe={probe}")) >= 20
    sd = compose_cfg("model=toy", f"probe={probe}", f"model.path={sd_folder}").probe
    assert (sd.n_per_class, sd.test_fraction) == (16, 0.25)


def test_edit_on_a_folder_without_preset_equals_model_local(compose_cfg, sd_folder):
    """``edit=fpe model.path=<SD folder>`` (no model=) = the same edit with model=local: 50 steps, 7.5, 3-13."""
    runs = {}
    for preset in ("toy", "local"):
        cfg = compose_cfg(f"model={preset}", "edit=fpe", f"model.path={sd_folder}", "seed=3")
        assert cfg.method.layers == "official"  # SD-1.x's preset: self 3-13
        runs[preset] = dispatch(cfg)["runs"][0]
    assert torch.equal(runs["toy"].latents["edited"], runs["local"].latents["edited"])


def test_a_bad_settings_file_is_one_line(compose_cfg, tmp_path):
    from omegaconf import OmegaConf

    from experiments.validate import validate

    (tmp_path / "sdattn.yaml").write_text("steps: 20\nsamplr: ddim\n")
    with pytest.raises(UserError, match="unknown keys \\['samplr'\\]"):
        validate(compose_cfg(f"model.path={tmp_path}"))
    (tmp_path / "sdattn.yaml").write_text("steps: 20\n")
    assert OmegaConf.select(compose_cfg(f"model.path={tmp_path}"), "model.steps") == 20


FAST_PROBE = ["model.steps=2", "probe.n_per_class=2", "probe.batch_size=40", "trainer.max_epochs=1", "logger=none",
              "probe.seeds=[0]"]


@pytest.mark.parametrize("probe", ["cross_attn", "self_attn", "cross_attn_tokens", "cross_attn_animal"])
def test_every_probe_runs_on_the_default_model(probe, compose_cfg):
    cfg = compose_cfg("model=toy", f"probe={probe}", *FAST_PROBE, "probe.layers=[1,7]")
    result = dispatch(cfg)
    assert result["tables"] and all(list(t.columns) == ["L1", "L7", "Avg"] for t in result["tables"].values())


@pytest.mark.parametrize("experiment,overrides", [
    ("attention_maps", ["model.steps=2"]),
    ("fig4_cross", ["ablation.num_inference_steps=2", "ablation.seeds=[0]", "ablation.cell=32"]),
    ("fig4_self", ["ablation.num_inference_steps=2", "ablation.seeds=[0]", "ablation.cell=32"]),
    ("fig5_tokens", ["ablation.num_inference_steps=2", "ablation.seeds=[0]", "ablation.cell=32"]),
    ("eval_toy_edit", ["toy_edit.n=1", "model.steps=2"]),
    ("eval_toy", ["eval.per_combo=1", "eval.num_inference_steps=2", "eval.batch=70"]),
    ("claims", ["model.steps=2", "claims.probe.n_per_class=2", "claims.probe.seeds=[0]", "claims.edits.seeds=[0]",
                "claims.edits.token_seeds=[0]",
                "claims.edits.sweep_pairs=[[a red car,a blue car]]", "trainer.max_epochs=1", "logger=none"]),
])
def test_every_experiment_runs_on_the_default_model(experiment, overrides, compose_cfg):
    """The README's experiments with the default model's own layers, words and prompts (no SD ranges)."""
    assert dispatch(compose_cfg("model=toy", f"experiment={experiment}", *overrides)) is not None


@pytest.mark.parametrize("argv,message", [
    (["edit=fpe", "seed=abc"], "seed='abc' is not a seed"),
    (["edit=fpe", "seed=nan"], "seed=nan is not a seed"),
    (["edit=fpe", "seed=99999999999999999999"], "is not a seed; allowed: an integer 0.."),
    (["edit=fpe", "method.num_inference_steps=0"], "method.num_inference_steps=0 is not a step count"),
    (["edit=fpe", "model.steps=-3"], "model.steps=-3 is not a step count"),
    (["edit=fpe", "method.guidance_scale=0"], "method.guidance_scale=0 is not a guidance scale"),
    (["edit=fpe", "method.guidance_scale=-5"], "method.guidance_scale=-5 is not a guidance scale"),
    (["edit=fpe", "method.guidance_scale=nan"], "method.guidance_scale=nan is not a guidance scale"),
    (["experiment=table4", "data.limit=0"], "data.limit=0: allowed an integer ≥ 1"),
    (["edit=fpe", "method.self_replace_steps=1.5"], "outside [0, 1]"),
    (["model=nope"], "Could not find 'model/nope'; Available options in 'model': anything_v4"),
    (["edit=fpe", "edit.sourc_prompt=x"], "'edit.sourc_prompt' is not a key of this config"),
    (["-m", "edit=fpe", "seed=1,nan"], "seed=nan is not a seed"),
    (["-m", "probe=cross_attn,nope"], "Could not find 'probe/nope'"),
    (["probe.layers=[1,"], "bad override"),
    (["dtype=float8"], "dtype='float8' is not one of"),
    (["device=cuda:7"], "device='cuda:7'"),
])
def test_bad_input_is_refused_before_anything_runs(argv, message):
    with pytest.raises(UserError) as e:
        check_command_line(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_command_lines_pass_the_check():
    check_command_line(["edit=fpe", "seed=42"])
    check_command_line(["-m", "experiment=table4", "method=fpe,p2p", "data.limit=4"])
    check_command_line(["--cfg", "job"])


def _cli(*args, cwd=ROOT, **env):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=300)


def test_cli_exit_status_and_no_folder_left(tmp_path):
    r = _cli("model=nope", f"paths.log_dir={tmp_path}")
    presets = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml") if not p.stem.startswith("_"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: Could not find 'model/nope'; Available options in 'model': {', '.join(presets)}"]
    r = _cli("edit=fpe_real", f"edit.image={tmp_path / 'missing.jpg'}", f"paths.log_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: image") and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no empty run folder
    r = _cli("edit=fpe", "seed=abc", SDATTN_VERBOSE="1")
    assert r.returncode != 0 and "Traceback" in r.stderr  # developers get the trace


def test_run_folder_is_named_and_run_log_holds_the_output(tmp_path):
    r = _cli("model=tiny", "probe=cross_attn", "probe.n_per_class=2", "model.steps=2", "probe.layers=[3]",
             "trainer.max_epochs=1", "logger=none", "progress=false", f"paths.log_dir={tmp_path}",
             f"paths.cache_dir={tmp_path / 'cache'}")
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.endswith("_probe-cross_attn-tiny_model.steps=2,probe.layers=_3_,probe.n_per_class=2,"
                             "trainer.max_epochs=1")
    first = r.stdout.splitlines()[0]
    assert first.startswith("probe cross_attn: model tiny (") and "50 steps" not in first
    log = (run / "run.log").read_text()
    assert "model tiny" in log and "Table 1" in log and "tables written to" in log
