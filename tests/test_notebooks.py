"""The notebooks (notebooks/*.py, jupytext percent format, paired with their .ipynb) run top to bottom on
the default model in the fast suite, at the small sizes their parameters cell offers
(``SDATTN_NOTEBOOK_SIZE=small``), so a notebook that crashes fails ``make test``; the slow suite runs
them at their full sizes."""

import os

import pytest

from .conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))


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
    monkeypatch.setenv("SDATTN_NOTEBOOK_SIZE", "small")


def test_every_script_is_paired_with_its_notebook():
    import jupytext

    assert len(NAMES) == 3 and NAMES == sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    for name in NAMES:
        script = [c.source for c in jupytext.read(NOTEBOOKS / f"{name}.py").cells]
        notebook = [c.source for c in jupytext.read(NOTEBOOKS / f"{name}.ipynb").cells]
        assert script == notebook, f"{name}: run `jupytext --sync notebooks/{name}.py`"


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


EXPECTED = {  # name → (text the notebook prints, images it shows)
    "01_layers_and_hooks": ("up_blocks", 1),
    "02_probing_and_figure3": ("Table 1: probing cross-attention maps", 1),
    "03_fpe_and_baselines": ("", 1),
}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_small(name):
    nb = execute(name)  # the kernel inherits SDATTN_NOTEBOOK_SIZE=small
    text, images = EXPECTED[name]
    assert text in _text(nb) and _images(nb) == images


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_full_size(name, monkeypatch):
    monkeypatch.setenv("SDATTN_NOTEBOOK_SIZE", "full")
    nb = execute(name)
    assert _images(nb) == EXPECTED[name][1]
