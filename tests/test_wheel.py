"""The package as a user installs it: a wheel built from a clean copy of the project carries the code, the
configs, the shipped models and the data; installed (``--no-deps --target``, the dependencies are this
venv's), ``sdattn`` runs from an empty folder, writes only under that folder, finds a user's own config by
name (``--config-dir``), explains itself and completes in the shell."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from experiments.help import TASKS

from .conftest import ROOT

CODE = ("sdattn", "probing", "editing", "evaluation", "toyworld", "experiments")
DATA = ("configs", "datasets", "models")  # → sdattn_lab/<name>/ in the wheel
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "outputs", "multirun", ".cache", "build", "dist", "*.egg-info",
                                    "__pycache__", "wandb", ".pytest_cache", ".ruff_cache")
MAX_WHEEL_MB = 20  # today ~9.4 MB, nearly all of it the toy model and the toy CLIP


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel_and_site(tmp_path_factory):
    """(the wheel, the folder it is installed into) — built from a copy holding only the project's files."""
    pytest.importorskip("setuptools", minversion="68")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp / "dist").glob("sdattn_lab-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return wheel, site


def test_wheel_carries_code_configs_models_and_data(wheel_and_site):
    wheel, _ = wheel_and_site
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {p.relative_to(ROOT).as_posix() for pkg in CODE for p in (ROOT / pkg).rglob("*.py")
            if "__pycache__" not in p.parts}
    assert code - names == set(), "add the package to [tool.setuptools] packages in pyproject.toml"
    for folder in DATA:
        shipped = {f"sdattn_lab/{folder}/{f}" for f in _files(ROOT / folder)}
        assert shipped - names == set() and shipped, folder
    assert "sdattn = experiments.console:main" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert not any(n.startswith(("tests/", "notebooks/", "docs/")) for n in names)
    assert wheel.stat().st_size < MAX_WHEEL_MB * 2**20


def _sdattn(site: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The installed console script, with only the install folder importable (not the checkout)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([str(site / "bin" / "sdattn"), *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=600)


def test_installed_wheel_runs_from_an_empty_folder(wheel_and_site, tmp_path):
    _, site = wheel_and_site
    installed = _files(site)
    work = tmp_path / "work"
    work.mkdir()
    r = _sdattn(site, work, "probe=cross_attn", "probe.n_per_class=2", "probe.num_inference_steps=1",
                "probe.layers=[2]", "trainer.max_epochs=1", "probe.control=false", "threads=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("probe cross_attn: model toy (") and str(site / "sdattn_lab" / "models") in r.stdout
    [table] = (work / "outputs" / "runs").glob("*_probe-cross_attn-toy*/cross_attn.csv")
    assert "overall" in table.read_text() and (work / ".cache" / "features").is_dir()
    assert list(table.parent.glob("wandb/offline-run-*/run-*.wandb"))  # W&B offline, in the run folder
    assert "FutureWarning" not in r.stderr and "anonymous" not in r.stderr  # diffusers' torch_dtype, W&B's

    # a model config of the user's own, found by name, in an edit run
    (work / "mine" / "model").mkdir(parents=True)
    (work / "mine" / "model" / "toy_fast.yaml").write_text("defaults: [toy, _self_]\nsteps: 2\n")
    r = _sdattn(site, work, "--config-dir", "mine", "model=toy_fast", "edit=fpe", "logger=none", "threads=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("edit fpe: model toy") and ": 2 steps" in r.stdout.splitlines()[0]
    assert list((work / "outputs" / "runs").glob("*_edit-fpe-toy*/*.png"))
    assert _files(site) == installed  # nothing written into the installed package


def test_installed_command_explains_itself_and_completes(wheel_and_site, tmp_path):
    _, site = wheel_and_site
    r = _sdattn(site, tmp_path, "--help")
    assert r.returncode == 0 and all(f"  {task} " in r.stdout for task in TASKS)
    assert "model_settings" not in r.stdout and "null_text" not in r.stdout
    r = _sdattn(site, tmp_path, "-sc", "query=bash", COMP_LINE="sdattn probe=", COMP_POINT="13")
    assert {"probe=cross_attn", "probe=self_attn"} <= set(r.stdout.split()), r.stdout + r.stderr
    r = _sdattn(site, tmp_path, "-sc", "install=bash")
    assert r.returncode == 0 and r.stdout.rstrip().endswith("-F hydra_bash_completion sdattn")
