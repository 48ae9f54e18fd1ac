"""Finished probe runs for the page's third tab: find them, read their class × layer tables, and put the
paper's Tables 1–3 beside them where the run's model has SD's layout.

A probe run folder (``python -m experiments.run probe=...``) holds ``.hydra/config.yaml`` and one
``<stem>.csv`` per table (rows classes + overall/control/chance, columns ``L<index>`` + ``Avg``; cells
``81.2`` or ``81.2 ± 3.4``). The paper's tables come from ``<paper_dir>/table<n>.yaml`` through
:func:`probing.tables.paper_probe_table`, as the probe task puts them beside its own tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from experiments.cli import task_of
from probing.tables import paper_probe_table
from sdattn.errors import UserError, first_line

SD_LAYERS = 16  # SD 1.x: 16 self + 16 cross layers; the paper's columns are in this numbering
SD_SETTINGS = "SD-1.x defaults"  # sdattn.settings' source for weights without their own sdattn.yaml
BESIDE_PAPER = "_vs_paper"  # a probe run's copy of a table with reference values in its cells: ours are the plain one


@dataclass
class ProbeTable:
    """One table of a probe run, with the paper's values for it (or why there are none)."""

    stem: str
    caption: str
    ours: pd.DataFrame  # % (rows classes + summary rows, columns L<i> + Avg)
    paper: pd.DataFrame | None  # % on the same classes and columns, where the paper has them
    note: str  # where the paper's values come from, or why they are missing


def run_config(folder: Path) -> dict | None:
    """The saved config of a run folder (unresolved), or None when it is not a run folder."""
    path = folder / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - an unreadable config is simply not a run we can show
        return None


def is_probe_run(folder: Path) -> bool:
    cfg = run_config(folder)
    if cfg is None:
        return False
    try:
        task = task_of(_root_=cfg)
    except Exception:  # noqa: BLE001 - a config from another version that does not resolve here
        return False
    return task == "probe" and any(folder.glob("*.csv"))


def find_probe_runs(root: str | Path, limit: int = 200) -> list[str]:
    """Finished probe run folders under ``root`` (its ``runs/`` and ``multiruns/``), newest first."""
    root = Path(root)
    found = [p.parent.parent for p in root.glob("*runs/**/.hydra/config.yaml") if is_probe_run(p.parent.parent)]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p) for p in found[:limit]]


def number(cell) -> float:
    """``81.2``, ``"81.2"``, ``"81.2 ± 3.4"`` or ``"81.2 (97)"`` (ours beside a reference) → 81.2 (NaN when empty)."""
    if isinstance(cell, (int, float)):
        return float(cell)
    text = str(cell).split("±")[0].split("(")[0].strip().rstrip("%")
    return float(text) if text else float("nan")


def read_table(path: Path) -> pd.DataFrame:
    """A probe table CSV → numbers in % (index: class, columns as written)."""
    df = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
    try:
        return df.map(number)
    except ValueError as e:
        raise UserError(f"table {path.name!r} has a cell that is not a number: {first_line(e)}") from None


def paper_table(paper_dir: str | Path, probe: str, token: str | None = None) -> tuple[pd.DataFrame | None, str]:
    """The paper's values for our probe ``probe`` (and Table 3's ``token``) in % with columns ``L<n>`` / ``Avg``,
    and a note saying where they come from or why there are none."""
    found = paper_probe_table(paper_dir, probe, token)
    if found is None:
        return None, f"no table of the paper in {Path(paper_dir).name}/ lists probe {probe!r}" + \
            (f" with token {token!r}" if token else "") + ": shown without it"
    table = pd.DataFrame.from_dict({str(cls): {"Avg" if k == "Avg" else f"L{k}": 100 * float(v)
                                               for k, v in values.items()}
                                    for cls, values in found["classes"].items()}, orient="index")
    table.index = [i.lower() for i in table.index]
    return table, f"paper: Table {found['table']} ({found['model']})" + (f", token {token!r}" if token else "")


def model_has_sd_layout(cfg, columns, beside_paper: Path) -> tuple[bool, str]:
    """Whether the run's model numbers its layers as SD 1.x, with the reason: the probe task wrote the table
    beside the paper's (it does so only on SD's layout, :func:`probing.tables.sd1x_layout`), or — for runs from
    before that — its settings are the SD-1.x defaults and its columns lie within 1..16."""
    if beside_paper.is_file():
        return True, ""
    try:
        source = str(OmegaConf.select(cfg, "model.settings.source"))
    except Exception as e:  # noqa: BLE001 - a config from another checkout may not resolve here
        return False, f"the run's model settings cannot be resolved here ({first_line(e)})"
    if not source.startswith(SD_SETTINGS):
        return False, f"the run's model has its own layer layout (settings: {source}), not SD's"
    layers = [c for c in columns if c != "Avg"]
    if not all(re.fullmatch(r"L\d+", c) and 1 <= int(c[1:]) <= SD_LAYERS for c in layers):
        return False, f"the run's columns {layers} are not SD-1.x layers 1..{SD_LAYERS}"
    return True, ""


def read_probe_run(folder: str | Path, paper_dir: str | Path) -> list[ProbeTable]:
    """Every table of the probe run in ``folder``, each with the paper's matching table when the run's model
    has SD's layout (rows and columns the two share)."""
    folder = Path(str(folder or "").strip()).expanduser()
    if not folder.is_dir():
        raise UserError(f"probe run folder {str(folder)!r} does not exist: pick one from the list or give a path")
    cfg = run_config(folder)
    if cfg is None or not is_probe_run(folder):
        raise UserError(f"{str(folder)!r} is not a finished probe run (no .hydra/config.yaml of a probe run "
                        "with <probe>.csv tables)")
    probe = cfg.get("probe") or {}
    name = str(probe.get("name", ""))
    tables = []
    for path in sorted(p for p in folder.glob("*.csv") if not p.stem.endswith(BESIDE_PAPER)):
        ours = read_table(path)
        md = path.with_suffix(".md")
        caption = md.read_text(encoding="utf-8").splitlines()[0].strip("* ") if md.is_file() else path.stem
        token = path.stem[len(name) + 1:] if name and path.stem.startswith(name + "_") else None
        sd, why = model_has_sd_layout(cfg, list(ours.columns), folder / f"{path.stem}{BESIDE_PAPER}.csv")
        paper, note = (None, why + ": the paper's values are not shown") if not sd else \
            paper_table(paper_dir, name, token)
        if paper is not None:
            rows = [r for r in ours.index if str(r).lower() in paper.index]
            layers = [c for c in ours.columns if c != "Avg"]
            same = layers == [c for c in paper.columns if c != "Avg"]  # Avg compares only over the same layers
            cols = [c for c in ours.columns if c in paper.columns and (c != "Avg" or same)]
            if rows and cols:
                paper = paper.loc[[str(r).lower() for r in rows], cols].set_axis(rows, axis=0)
            else:
                paper, note = None, f"{note}: no class or layer in common with this table"
        tables.append(ProbeTable(path.stem, caption, ours, paper, note))
    return tables
