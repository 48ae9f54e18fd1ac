"""Finished probe runs for the page's third tab: find them, read their class × layer tables, and put the
paper's Tables 1–3 beside them where the run's model has SD's layout.

A probe run folder (``python -m experiments.run probe=...``) holds ``.hydra/config.yaml`` and one
``<stem>.csv`` per table (rows classes + overall/control/chance, columns ``L<index>`` + ``Avg``; cells
``81.2`` or ``81.2 ± 3.4``). The paper's tables are read from ``<paper_dir>/table<n>.{yaml,yml,csv}``
when present, in any of the plain layouts described at :func:`read_paper_table`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf

from sdattn.errors import UserError, first_line

SD_LAYERS = 16  # SD 1.x: 16 self + 16 cross layers; the paper's columns are in this numbering
SD_SETTINGS = "SD-1.x defaults"  # sdattn.settings' source for weights without their own sdattn.yaml
PAPER_TABLES = {("cross", "class"): 1, ("self", "class"): 2, ("cross", "token"): 3}
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
    task = cfg.get("task") or ("edit" if cfg.get("edit") else "probe")
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


def layer_key(key) -> str | None:
    """``3``, ``"3"``, ``"L3"``, ``"Layer 3"`` → ``"L3"``; ``"Avg."`` → ``"Avg"``; anything else → None."""
    text = str(key).strip()
    if text.lower().rstrip(".") in ("avg", "average", "mean"):
        return "Avg"
    m = re.fullmatch(r"(?:l|layer)?[\s_]*(\d+)", text, flags=re.IGNORECASE)
    return f"L{int(m[1])}" if m else None


def _as_table(node, columns=None) -> pd.DataFrame | None:
    """{class: {layer: value}} or {class: [values]} with ``columns`` → DataFrame, else None."""
    if not isinstance(node, dict) or not node:
        return None
    rows = {}
    for cls, values in node.items():
        if isinstance(values, dict):
            cells = {layer_key(k): v for k, v in values.items()}
        elif isinstance(values, list) and columns is not None and len(values) == len(columns):
            cells = dict(zip((layer_key(c) for c in columns), values))
        else:
            return None
        if None in cells or not all(isinstance(v, (int, float)) or v is None for v in cells.values()):
            return None
        rows[str(cls).strip()] = cells
    return pd.DataFrame.from_dict(rows, orient="index").astype(float)


def _find_table(node, part: str | None, columns: list | None = None):
    """The first class × layer mapping inside a YAML document (inside ``part``'s node when given); a
    ``layers`` / ``columns`` list names the columns of list rows at its level and below."""
    if isinstance(node, dict):
        columns = next((node[k] for k in ("layers", "columns") if isinstance(node.get(k), list)), columns)
        if part is not None:
            for key, child in node.items():
                if str(key).strip().lower() == part.lower():
                    return _find_table(child, None, columns)
        table = _as_table(node, columns)
        if table is not None:
            return table
        for child in node.values():
            found = _find_table(child, part, columns)
            if found is not None:
                return found
    return None


def read_paper_table(paper_dir: str | Path, n: int, part: str | None = None) -> tuple[pd.DataFrame | None, str]:
    """The paper's Table ``n`` (``part``: the token of Table 3) in % with ``L<i>`` / ``Avg`` columns, and a note.

    ``table<n>.csv``: first column the class, then one column per layer (``Layer 3`` / ``L3`` / ``3``);
    ``table<n>.yaml``: any mapping ``{class: {layer: value}}`` or ``{class: [values]}`` beside a ``layers``
    list, under a key named after ``part`` where the table has parts. Fractions (all ≤ 1) become %.
    """
    folder = Path(paper_dir)
    files = [folder / f"table{n}.{ext}" for ext in ("yaml", "yml", "csv")]
    path = next((p for p in files if p.is_file()), None)
    if path is None:
        return None, f"the paper's Table {n} is not in {folder.name}/ (table{n}.yaml): shown without it"
    try:
        if path.suffix == ".csv":
            raw = pd.read_csv(path, index_col=0)
            table = raw.rename(columns=layer_key).astype(float)
            if any(c is None for c in table.columns):
                table = None
        else:
            table = _find_table(yaml.safe_load(path.read_text(encoding="utf-8")), part)
    except (OSError, ValueError, yaml.YAMLError) as e:
        return None, f"{path.name} cannot be read ({first_line(e)}): shown without the paper"
    if table is None:
        return None, f"{path.name} holds no class × layer table{f' for {part!r}' if part else ''}: shown without it"
    values = table.to_numpy(dtype=float)
    if (values[~pd.isna(values)] <= 1.0).all():
        table = table * 100
    table.index = [str(i).strip().lower() for i in table.index]
    return table, f"paper: Table {n}{f' ({part!r})' if part else ''} from {path.name}"


def model_has_sd_layout(cfg, columns) -> tuple[bool, str]:
    """Whether the run's model numbers its layers as SD 1.x (its settings are the SD-1.x defaults and its
    columns lie within 1..16), with the reason."""
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
    kind, name = str(probe.get("kind", "cross")), str(probe.get("name", ""))
    tables = []
    for path in sorted(p for p in folder.glob("*.csv") if not p.stem.endswith(BESIDE_PAPER)):
        ours = read_table(path)
        md = path.with_suffix(".md")
        caption = md.read_text(encoding="utf-8").splitlines()[0].strip("* ") if md.is_file() else path.stem
        token = path.stem[len(name) + 1:] if name and path.stem.startswith(name + "_") else None
        which = PAPER_TABLES[(kind if kind in ("cross", "self") else "cross", "token" if token else "class")]
        sd, why = model_has_sd_layout(cfg, list(ours.columns))
        paper, note = (None, why + ": the paper's values are not shown") if not sd else \
            read_paper_table(paper_dir, which, token)
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
