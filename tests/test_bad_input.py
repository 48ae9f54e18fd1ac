"""Nothing silently wrong, nothing lost (issue 23): output folders that cannot be written, image paths
outside their dataset's folder, empty prompts, keys no part of the run reads, runs started together,
SDATTN_VERBOSE, unreadable inputs and real images the model cannot represent — each refused or reported
in one line before anything loads (or, for the last, warned about), with the settings checked by the
schema of their config path."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

import experiments.tasks.probe as probe_task
import probing.features as probe_features
from evaluation.datasets import EditExample, finish_dataset, load_dataset
from evaluation.records import RecordStore
from experiments.cli import check_command_line
from experiments.run import dispatch
from experiments.validate import validate
from sdattn.errors import UserError

from .conftest import PHOTO, ROOT, needs_photo


def refused(argv: list[str]) -> str:
    """The one-line message ``check_command_line`` refuses ``argv`` with."""
    with pytest.raises(UserError) as e:
        check_command_line(argv)
    assert "\n" not in str(e.value)
    return str(e.value)


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "SDATTN_VERBOSE": "0", **env}, timeout=300)


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


# ---------------------------------------------------------------------------- 1. output folders

@pytest.mark.parametrize("key,argv", [
    ("hydra.run.dir", ["edit=fpe", "hydra.run.dir={f}/run"]),
    ("paths.log_dir", ["edit=fpe", "paths.log_dir={f}/logs"]),
    ("paths.cache_dir", ["probe=cross_attn", "paths.cache_dir={f}/cache"]),
    ("benchmark.root", ["experiment=table4", "benchmark.root={f}/bench"]),
    ("hydra.sweep.dir", ["-m", "edit=fpe", "seed=1,2", "hydra.sweep.dir={f}/sweep"]),
])
def test_output_folders_are_checked_before_anything_loads(key, argv, a_file, tmp_path):
    message = refused([a.format(f=a_file) for a in argv])
    assert message.startswith(f"{key}='{a_file}/") and f"is under the file '{a_file}'" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing made


def test_unwritable_benchmark_root_is_one_line_exit_2_and_no_folder(a_file, tmp_path, capsys, monkeypatch):
    from experiments.run import cli

    argv = ["experiment=table4", "model=tiny", f"benchmark.root={a_file}/bench", f"paths.log_dir={tmp_path / 'logs'}"]
    monkeypatch.setattr(sys, "argv", ["experiments.run", *argv])
    with pytest.raises(SystemExit) as e:  # the CLI's entry, in this process
        cli()
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: benchmark.root='{a_file}/bench' is under the file '{a_file}', not a folder; give a folder to write to"]
    assert not (tmp_path / "logs").exists()


def test_perf_output_is_checked_before_the_model_loads(a_file, monkeypatch, capsys):
    from experiments import perf

    monkeypatch.setattr("experiments.common.load_model", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        perf.main(["edit", "--model", "tiny", "--out", f"{a_file}/perf"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: --out='{a_file}/perf' is under the file '{a_file}', not a "
                                               "folder; give a folder to write to")


# -------------------------------------------------------------------------- 2. dataset image paths

def _fpe_real(tmp_path, image_name):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "car.png")
    data = tmp_path / "real.json"
    data.write_text(json.dumps([{"image_name": "car.png", "soure_prompt": "a car", "edit_prompt": "a red car"},
                                {"image_name": image_name, "soure_prompt": "a car", "edit_prompt": "a blue car"}]))
    return dict(root=str(tmp_path / "imgs"), limit=None, path=str(data))


def test_image_paths_stay_inside_data_root(tmp_path):
    with pytest.raises(UserError, match=r"^pair car_real_edit/00001: image path '\.\./\.\./\.\./\.\./etc/passwd' "
                                         r"leaves data.root '.*imgs'; allowed: a path inside it$"):
        load_dataset("car_real_edit", **_fpe_real(tmp_path, "../../../../etc/passwd"))
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    with pytest.raises(UserError, match=rf"^pair car_real_edit/00001: image path '{outside}' is absolute; .*"
                                        r"\+data.allow_absolute_paths=true\)$"):
        load_dataset("car_real_edit", **_fpe_real(tmp_path, str(outside)))
    ds = load_dataset("car_real_edit", **_fpe_real(tmp_path, str(outside)), allow_absolute_paths=True)
    assert ds.examples[1].image_path == str(outside) and ds.missing_images == []
    ds = load_dataset("car_real_edit", **_fpe_real(tmp_path, "sub/../car.png"))  # stays inside: fine
    assert ds.examples[1].image_path == str(tmp_path / "imgs" / "sub" / ".." / "car.png")
    pnp = tmp_path / "pnp.yaml"
    pnp.write_text("init_img: ../horse.png\ntarget_prompts: [a zebra]\n")
    with pytest.raises(UserError, match=r"^pair pnp_ti2i/000: image path '\.\./horse.png' leaves the folder of "
                                        "data.path"):
        load_dataset("pnp_ti2i", path=str(pnp))
    (tmp_path / "mapping_file.json").write_text(json.dumps({"7": {"image_path": "/etc/passwd",
                                                                  "original_prompt": "a", "editing_prompt": "b"}}))
    with pytest.raises(UserError, match=r"^pair pie_bench/7: image path '/etc/passwd' is absolute"):
        load_dataset("pie_bench", root=str(tmp_path))


def test_file_names_from_pair_ids_are_flat(tmp_path):
    from evaluation.datasets import file_stem

    image = torch.rand(1, 3, 8, 8)
    RecordStore(tmp_path).save_images("pie_bench/a/../../b", image, image)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["pie_bench_a_b.png", "pie_bench_a_b_source.png"]
    assert file_stem("car_fake_edit/00001") == "car_fake_edit_00001"
    pairs = [EditExample("x/1", "a car", "a red car"), EditExample("x_1", "a car", "a blue car")]
    with pytest.raises(UserError, match="pairs 'x/1' and 'x_1' of d would share the file name 'x_1'"):
        finish_dataset("d", pairs, None)


# ------------------------------------------------------------------- 3. empty prompts, unused keys

@pytest.mark.parametrize("argv,message", [
    (["edit=fpe", "edit.target_prompt="], "edit.target_prompt='' is empty; allowed: a non-empty prompt"),
    (["edit=fpe", "edit.source_prompt=' '"], "edit.source_prompt=' ' is empty"),
    (["experiment=attention_maps", "prompt="], "prompt='' is empty"),
    (["experiment=fig4_self", "ablation.target_prompt="], "ablation.target_prompt='' is empty"),
])
def test_empty_prompts_are_refused(argv, message):
    assert message in refused(argv)


@needs_photo
def test_a_real_image_may_be_inverted_without_a_caption():
    check_command_line(["edit=fpe_real", f"edit.image={PHOTO}"])  # the paper's default: source prompt ""


def test_a_dataset_pair_with_an_empty_prompt_is_refused(tmp_path):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"soure_prompt": "a car", "edit_prompt": "a red car"},
                                {"soure_prompt": "a car", "edit_prompt": "  "}]))
    with pytest.raises(UserError, match="^pair car_fake_edit/00001: the target prompt is empty"):
        load_dataset("car_fake_edit", path=str(data))


@pytest.mark.parametrize("argv,shown", [
    (["edit=fpe", "+foo=bar"], "+foo=bar"),
    (["edit=fpe", "+edit.sourc_prompt=x", "+foo=bar"], "+edit.sourc_prompt=x, +foo=bar"),
    (["edit=fpe", "probe.n_per_class=3"], "probe.n_per_class=3"),
    (["experiment=table4", "+data.foo=1"], "data.foo is not a setting of data 'toy_edit'"),
])
def test_keys_the_run_does_not_read_are_refused(argv, shown):
    message = refused(argv)
    assert shown in message and (message.startswith("not read by this run") or "not a setting" in message)


def test_keys_the_run_reads_may_be_added(tmp_path):
    check_command_line(["probe=cross_attn", "+trainer.precision=bf16-mixed"])  # a Trainer argument
    data = tmp_path / "real.json"
    data.write_text("[]")
    check_command_line(["experiment=table4", "data=car_real_edit", f"data.path={data}", f"data.root={tmp_path}",
                        "+data.allow_absolute_paths=true"])


def test_a_rule_belongs_to_a_path_not_to_a_key_name(compose_cfg):
    """``toy_edit.n`` is a count; another key called ``n`` picks up no rule by its name."""
    validate(compose_cfg("experiment=claims", "+claims.edits.n=0"))
    with pytest.raises(UserError, match=r"^toy_edit.n=0: allowed an integer ≥ 1"):
        validate(compose_cfg("experiment=eval_toy_edit", "toy_edit.n=0"))


# ---------------------------------------------------------------------- 4. runs never share a folder

def test_two_runs_with_one_folder_name_get_two_folders(tmp_path, capsys):
    for argv in (["edit=fpe", f"hydra.run.dir={tmp_path / 'run'}"], ["edit=fpe", f"paths.log_dir={tmp_path}"]):
        folder = check_command_line(argv)
        first, second = folder.claim(), folder.claim()  # two runs started in the same second
        assert first != second and second.endswith("_2'")
        assert "this run writes to" in capsys.readouterr().err
    assert (tmp_path / "run" / ".hydra").is_dir() and (tmp_path / "run_2" / ".hydra").is_dir()


def test_two_probe_jobs_capture_each_prompt_once(compose_cfg, tiny_pipe, tmp_path, monkeypatch):
    """Two runs of one probe filling one cache at once: every prompt is captured once, the work shared."""
    captured, lock = [], threading.Lock()

    def capture(pipe, layers, spec, prompts, seeds, words, steps, guidance):
        time.sleep(0.2)  # long enough for the other job to reach the same batch
        with lock:
            captured.extend(zip(prompts, seeds))
        return {layer.label: torch.zeros(len(prompts), 2) for layer in layers}

    monkeypatch.setattr(probe_task, "load_model", lambda cfg: tiny_pipe)
    monkeypatch.setattr(probe_features, "capture_features", capture)
    cfgs = [compose_cfg("probe=cross_attn", "probe.n_per_class=4", "probe.batch_size=5", "probe.layers=[3]",
                        "probe.shard=0/1", f"paths.cache_dir={tmp_path / 'shared'}") for _ in range(2)]
    jobs = [threading.Thread(target=probe_task.run, args=(cfg,)) for cfg in cfgs]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(captured) == 40 and len(set(captured)) == 40  # 10 colours × 4 seeds, each image once


# ------------------------------------------------------------------------- 6. SDATTN_VERBOSE

def test_verbose_adds_the_traceback_and_keeps_exit_2_and_no_folder(tmp_path):
    r = _cli("model=sd15", "edit=fpe", f"paths.log_dir={tmp_path}", SDATTN_VERBOSE="1")
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: model 'runwayml/stable-diffusion-v1-5'")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


# ------------------------------------------------------------------- 7. input files, before the model

def test_input_files_are_checked_before_anything_loads(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert refused(["edit=fpe_real", f"edit.image={broken}"]).startswith(f"image '{broken}' cannot be read as an image")
    assert refused(["edit=fpe_real", f"edit.image={tmp_path / 'gone.jpg'}"]) == \
        f"image '{tmp_path / 'gone.jpg'}' does not exist or is not a file"
    assert refused(["edit=fpe_real"]).startswith("edit.image is required for edit=fpe_real")
    assert refused(["experiment=table4", "data=car_fake_edit", f"data.path={tmp_path / 'gone.json'}"]) == \
        f"data.path='{tmp_path / 'gone.json'}' does not exist"


# ------------------------------------------------------------- 8. can the model represent the image?

@needs_photo
def test_a_photo_the_toy_model_cannot_represent_is_warned_about(compose_cfg, capsys):
    dispatch(compose_cfg("model=toy", "edit=fpe_real", f"edit.image={PHOTO}", "model.steps=2"))
    lines = capsys.readouterr().out.splitlines()
    vae = next(ln for ln in lines if ln.startswith("reconstruction of the input image: "))
    assert "by the VAE round trip" in vae and float(vae.split(": ")[1].split(" dB")[0]) < 20
    assert lines[lines.index(vae) + 1].startswith("warning: model toy reconstructs this image at ")
    assert "cannot represent it" in lines[lines.index(vae) + 1]
