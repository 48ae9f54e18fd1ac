"""The notebooks (notebooks/*.py, jupytext percent format, paired with their .ipynb) run top to bottom
on the default model, so they never rot."""

import os

import pytest

from .conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"


def execute(name: str, timeout: int = 600):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


@pytest.fixture(autouse=True)
def _kernel_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_every_script_is_paired_with_its_notebook():
    import jupytext

    scripts = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))
    assert len(scripts) == 3 and scripts == sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    for name in scripts:
        script = [c.source for c in jupytext.read(NOTEBOOKS / f"{name}.py").cells]
        notebook = [c.source for c in jupytext.read(NOTEBOOKS / f"{name}.ipynb").cells]
        assert script == notebook, f"{name}: run `jupytext --sync notebooks/{name}.py`"


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def test_layers_and_hooks_notebook_runs():
    nb = execute("01_layers_and_hooks")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "up_blocks" in text and _images(nb) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["02_probing_and_figure3", "03_fpe_and_baselines"])
def test_slow_notebooks_run(name):
    nb = execute(name)
    assert _images(nb) >= 1
