"""Benchmark tables: Table 4 (rows = methods, per dataset) and Table 5 (the paper's layout: rows =
methods × columns = configured groups × {fake, real} × {CS, CDS}, then editing time fake, real) from the
record store, written as CSV, Markdown and LaTeX by
the project's one table writer (:func:`sdattn.tables.write_table`)::

    <root>/<data>/table4.{csv,md,tex}     rows = methods of that dataset
    <root>/table5.{csv,md,tex}            rows = methods × columns = datasets
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sdattn.errors import UserError
from sdattn.files import REPO_ROOT
from sdattn.tables import write_table

from .metric_models import TINY_CLIP
from .records import collect, collect_columns

COLUMNS = {  # the runner's scores → the paper's headers (Table 4); the metric plug-ins' columns follow
    "clip_score": "CLIP score ↑",
    "clip_directional": "CLIP dir. sim. ↑",
    "time_s": "Time (s) ↓",
}
REL_FPE = "Time rel. FPE"
TABLE5_METRICS = ("clip_score", "clip_directional")


def mean_std(values: list) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None], dtype=float)
    return (float("nan"), float("nan")) if v.size == 0 else (float(v.mean()), float(v.std()))


def cell(mean: float, std: float, digits: int) -> str:
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


DIGITS = {"clip_score": 2, "clip_directional": 4, "time_s": 2}


# Presentation only: the paper's row order (FPE first: the time column is relative to it); methods not
# listed (a new editor) follow by name. Which methods exist is never listed: it is configs/method/.
ROW_ORDER = ("fpe", "p2p", "masactrl", "pnp", "sdedit_0.5", "sdedit_0.75", "diffedit", "pix2pix_zero",
             "instructpix2pix")


def row_order(methods) -> list[str]:
    """FPE first, then the other methods in the paper's order, then any others by name."""
    return sorted(methods, key=lambda m: (ROW_ORDER.index(m) if m in ROW_ORDER else len(ROW_ORDER), m))


def time_ratio(rows: list[dict], fpe_rows: list[dict]) -> str:
    """Mean time of ``rows`` over FPE's, from the rows timed in the same runs only (``run_id``: one
    process or one multirun, one machine); "–" when no run timed both (times of different runs,
    machines or loads are not comparable)."""
    common = {r.get("run_id") for r in rows} & {r.get("run_id") for r in fpe_rows} - {None, ""}
    if not common:
        return "–"
    mine = mean_std([r["time_s"] for r in rows if r.get("run_id") in common])[0]
    fpe = mean_std([r["time_s"] for r in fpe_rows if r.get("run_id") in common])[0]
    return f"{mine / fpe:.2f}×" if fpe else "–"


def scored(rows: list[dict], key: str) -> tuple[list, int]:
    """(the values of ``key`` in the rows that have it, how many of them are None: not scored)."""
    values = [r[key] for r in rows if key in r]
    return values, sum(v is None for v in values)


def plugin_cell(rows: list[dict], key: str, digits: int) -> str:
    """"mean ± std" of a metric plug-in's column, "(n/N)" after it when N − n pairs could not be scored."""
    values, missing = scored(rows, key)
    text = cell(*mean_std(values), digits)
    return f"{text} ({len(values) - missing}/{len(values)})" if missing else text


def missing_notes(rows_by_method: dict[str, list[dict]], columns: dict[str, dict]) -> list[str]:
    """One note per (column, method) with pairs not scored: "Mask IoU: fpe over 3 of 4 pairs; 1 unreadable"."""
    notes = []
    for key, spec in columns.items():
        for m in row_order(rows_by_method):
            values, missing = scored(rows_by_method[m], key)
            if missing:
                notes.append(f"{spec['header'].rstrip(' ↑↓')}: {m} over {len(values) - missing} of {len(values)} "
                             f"pairs; {missing} {spec['missing']}")
    return notes


def table4(rows_by_method: dict[str, list[dict]], columns: dict[str, dict] | None = None,
           paper: dict | None = None) -> pd.DataFrame:
    """Rows = methods; columns = the paper's (CLIP score, CLIP dir. sim., Time), then each metric plug-in
    column of ``columns`` ({record key: {header, digits, missing}}) that some row has (+ time relative to
    FPE, between rows timed in the same run, when FPE rows exist). Cells "mean ± std" over pairs; a plug-in
    cell over fewer pairs (some not scored) says "(n/N)". With ``paper`` (this dataset's entry of
    ``datasets/paper/table4.yaml``) the CS and CDS cells of the methods it has are "ours (paper)"."""
    data = {}
    plugins = {k: c for k, c in (columns or {}).items()
               if any(k in r for rows in rows_by_method.values() for r in rows)}
    for m in row_order(rows_by_method):
        rows = rows_by_method[m]
        cells = {COLUMNS[k]: cell(*mean_std([r.get(k) for r in rows]), DIGITS[k]) for k in COLUMNS}
        if paper is not None and isinstance(paper.get(m), dict):
            for k, short in TABLE5_SHORT.items():
                cells[COLUMNS[k]] = with_paper(cells[COLUMNS[k]], paper[m].get(short), DIGITS[k])
        cells.update({c["header"]: plugin_cell(rows, k, c["digits"]) for k, c in plugins.items()})
        if "fpe" in rows_by_method:
            cells[REL_FPE] = time_ratio(rows, rows_by_method["fpe"])
        cells["Pairs"] = str(len(rows))
        data[m] = cells
    return pd.DataFrame.from_dict(data, orient="index")


# Table 5 in the paper's layout (presentation only: which methods exist is configs/method/).
TABLE5_ROWS = {"sdedit_0.5": "SDEdit (0.5)", "sdedit_0.75": "SDEdit (0.75)", "shape_guided": "Shape-Guided",
               "diffedit": "DiffEdit", "pix2pix_zero": "Pix2pixzero", "p2p": "P2P", "pnp": "PnP",
               "masactrl": "MasaCtrl", "fpe": "FPE"}  # method config name → the paper's row label, in its order
TABLE5_SHORT = {"clip_score": "CS", "clip_directional": "CDS"}
KINDS = ("fake", "real")  # generated / real source images
TIME = "Editing time (s)"


@dataclass(frozen=True)
class Table5Group:
    """One column group of Table 5: a label and the dataset (record-store ``data`` name) of each image
    kind (None: the group has no such kind); ``paper``: the paper's group label its numbers compare to."""

    label: str
    fake: str | None = None
    real: str | None = None
    paper: str | None = None


def table5_groups(groups) -> list[Table5Group]:
    """The ``benchmark.table5.groups`` config (a list of {label, fake, real, paper}) → groups; bad → UserError."""
    if not isinstance(groups, (list, tuple)) or not groups:
        raise UserError("benchmark.table5.groups must be a non-empty list of {label, fake, real, paper}")
    out = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not g.get("label"):
            raise UserError(f"benchmark.table5.groups[{i}] needs a label (and fake/real dataset names)")
        unknown = sorted(set(g) - {"label", *KINDS, "paper"})
        if unknown:
            raise UserError(f"benchmark.table5.groups[{i}].{unknown[0]} is not a key; keys: label, fake, real, paper")
        if not any(g.get(k) for k in KINDS):
            raise UserError(f"benchmark.table5.groups[{i}] ({g['label']}) names no dataset: give fake and/or real")
        out.append(Table5Group(str(g["label"]), *(None if g.get(k) is None else str(g[k]) for k in KINDS),
                               None if g.get("paper") is None else str(g["paper"])))
    return out


def table_options(table: str | None, groups=None, compare_paper: bool = False) -> dict:
    """The keyword arguments of :func:`write_tables` for a benchmark's settings: Table 5 only by the table5
    experiments (``table``), in the layout ``groups`` (``benchmark.table5.groups``, checked here: a bad layout
    is refused before anything runs), with the paper's numbers when ``compare_paper``."""
    return {"table5_too": table == "table5", "table5_layout": table5_groups(groups) if groups is not None else None,
            "compare_paper": bool(compare_paper)}


def groups_from_records(collected: dict[str, dict[str, list[dict]]]) -> list[Table5Group]:
    """Without a configured layout: one group per dataset, its kind read from the records (real when
    they carry an image path)."""
    def real(ds):
        return any(r.get("image_path") for rows in collected[ds].values() for r in rows)

    return [Table5Group(ds, **{"real" if real(ds) else "fake": ds}) for ds in sorted(collected)]


def table5_row_order(methods) -> list[str]:
    """The paper's Table 5 order, then any other method by name."""
    order = list(TABLE5_ROWS)
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


def paper_value(paper: dict | None, method: str, group: str | None, kind: str, metric: str):
    """The paper's published number (``datasets/paper/table5.yaml``) or None where it has none ("-")."""
    if not paper or (group is None and metric != "time_s"):
        return None
    entry = (paper.get("methods") or {}).get(method) or {}
    if metric == "time_s":
        return (entry.get("time_s") or {}).get(kind)
    return (((entry.get("scores") or {}).get(group) or {}).get(kind) or {}).get(TABLE5_SHORT[metric])


def with_paper(ours: str, value, digits: int) -> str:
    return f"{ours} ({'–' if value is None else f'{value:.{digits}f}'})"


def table5(collected: dict[str, dict[str, list[dict]]], groups: list[Table5Group] | None = None,
           paper: dict | None = None) -> pd.DataFrame:
    """The paper's Table 5: rows = methods (its labels and order); per group and image kind "CS", "CDS";
    then "Editing time (s)" fake, real (mean over that kind's datasets); "–" where a method has no such
    setting. With ``paper`` (``datasets/paper/table5.yaml``) each cell is "ours (paper)"; the paper's
    times are shown only when some group maps to one of its groups (``paper``)."""
    groups = groups or groups_from_records(collected)
    methods = table5_row_order({m for d in collected.values() for m in d})
    paper_layout = any(g.paper for g in groups)
    data = {}
    for m in methods:
        cells = {}
        for g in groups:
            for kind in KINDS:
                ds = getattr(g, kind)
                if ds is None:
                    continue
                rows = collected.get(ds, {}).get(m)
                for k in TABLE5_METRICS:
                    ours = cell(*mean_std([r.get(k) for r in rows]), DIGITS[k]) if rows else "–"
                    if paper is not None:
                        ours = with_paper(ours, paper_value(paper, m, g.paper, kind, k), DIGITS[k])
                    cells[f"{g.label} {kind} {TABLE5_SHORT[k]}"] = ours
        for kind in KINDS:
            rows = [r for g in groups if getattr(g, kind) is not None
                    for r in collected.get(getattr(g, kind), {}).get(m, [])]
            ours = cell(*mean_std([r.get("time_s") for r in rows]), DIGITS["time_s"]) if rows else "–"
            if paper is not None:
                value = paper_value(paper, m, None, kind, "time_s") if paper_layout else None
                ours = with_paper(ours, value, DIGITS["time_s"])
            cells[f"{TIME} {kind}"] = ours
        data[TABLE5_ROWS.get(m, m)] = cells
    return pd.DataFrame.from_dict(data, orient="index")


def load_paper_table(number: int, path: str | Path | None = None) -> dict:
    """The paper's Table ``number`` as transcribed (``datasets/paper/table<number>.yaml``)."""
    path = Path(path) if path else REPO_ROOT / "datasets" / "paper" / f"table{number}.yaml"
    if not path.is_file():
        raise UserError(f"benchmark.compare_paper: the paper's numbers file {path} does not exist")
    return yaml.safe_load(path.read_text()) or {}


def load_paper_table5(path: str | Path | None = None) -> dict:
    """The paper's Table 5 (``datasets/paper/table5.yaml``; null = "-" in the paper)."""
    return load_paper_table(5, path)


def paper_number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def paper_table4(paper: dict) -> pd.DataFrame:
    """The paper's Table 4 as printed: rows = its four datasets, columns CS and CDS of P2P and FPE ("Ours")."""
    data = {}
    for entry in (paper.get("datasets") or {}).values():
        data[entry["label"]] = {f"{TABLE5_SHORT[k]} {label}": paper_number((entry.get(m) or {}).get(TABLE5_SHORT[k]),
                                                                           DIGITS[k])
                                for k in TABLE5_METRICS for m, label in (("p2p", "P2P"), ("fpe", "FPE"))}
    return pd.DataFrame.from_dict(data, orient="index")


def paper_table5(paper: dict) -> pd.DataFrame:
    """The paper's Table 5 in our Table 5 layout: rows = its methods (our labels), per group and image kind CS and
    CDS, then the editing times fake, real (its A100's); "–" where it has "-"."""
    data = {}
    for m in paper.get("methods") or {}:
        cells = {f"{g} {kind} {TABLE5_SHORT[k]}": paper_number(paper_value(paper, m, g, kind, k), DIGITS[k])
                 for g in paper.get("groups") or [] for kind in KINDS for k in TABLE5_METRICS}
        cells |= {f"{TIME} {kind}": paper_number(paper_value(paper, m, None, kind, "time_s"), DIGITS["time_s"])
                  for kind in KINDS}
        data[TABLE5_ROWS.get(m, m)] = cells
    return pd.DataFrame.from_dict(data, orient="index")


def paper_role(paper: dict, model_name: str, same_data: bool) -> str:
    """What the paper's numbers are to this run: a target only for its own model (``model_configs``) on its
    own data; otherwise another model's (or data's) reference."""
    source = (f"Liu et al. 2024, Table {paper.get('table')} ({paper.get('model')}"
              + (f", {paper['hardware']}" if paper.get("hardware") else "") + ")")
    if same_data and model_name in (paper.get("model_configs") or []):
        return f"{source}: the target of this run (same model and data)"
    what = "model" if same_data else "model and data"
    return f"{source}: a different {what}'s reference, not a target for model {model_name or '?'}"


def caption(what: str, clip_name: str) -> str:
    text = f"{what}; CLIP: {clip_name}"
    if clip_name == TINY_CLIP:
        text += " (seeded tiny random CLIP: smoke run, the numbers are meaningless)"
    return text


def write_tables(root: str | Path, clip_name: str, model_name: str = "", table5_too: bool = True,
                 table5_layout: list[Table5Group] | None = None, compare_paper: bool = False) -> dict:
    """Aggregate everything under ``root`` scored with ``clip_name``; write Table 4 per dataset and (with
    ``table5_too``: the Table 5 experiment) Table 5 across datasets, in ``table5_layout``'s column groups
    (default: one per dataset). With ``compare_paper``: the paper's numbers in the cells it shares with ours
    ("ours (paper)": Table 4 on its four datasets, Table 5 in groups mapped to its groups), and its whole table
    written beside ours (``table4_paper`` / ``table5_paper``), captioned as a target or as another model's reference.
    Returns {"table4": {data: (DataFrame, paths, caption)}, "table5": (DataFrame, paths, caption) or None,
    "paper": (DataFrame, paths, caption) or None}."""
    root = Path(root)
    collected = collect(root, clip_name)
    columns = collect_columns(root)
    result: dict = {"table4": {}, "table5": None, "paper": None}
    model = f", model {model_name}" if model_name else ""
    paper4 = load_paper_table(4) if compare_paper else None
    paper4_sets = (paper4 or {}).get("datasets") or {}
    for ds, by_method in collected.items():
        t = table4(by_method, columns, paper4_sets.get(ds))
        notes = missing_notes(by_method, columns)
        missing = f"; (n/N) = over n of N pairs: {'; '.join(notes)}" if notes else ""
        vs = f"; (paper) = {paper_role(paper4, model_name, True)}" if ds in paper4_sets else ""
        cap = caption(f"Table 4 — {ds}{model}: mean ± std over pairs, time = s/image (warm); {REL_FPE}: between "
                      f"rows timed in the same run (– = not timed together){vs}{missing}", clip_name)
        result["table4"][ds] = (t, write_table(t, root / ds, "table4", cap, index_label="method"), cap)
    if collected and table5_too:
        paper5 = load_paper_table5() if compare_paper else None
        layout = table5_layout or groups_from_records(collected)
        mapped = any(g.paper for g in layout)
        t = table5(collected, layout, paper5 if mapped else None)
        vs = f"; cells: ours (paper), – = none; paper = {paper_role(paper5, model_name, mapped)}" \
            if compare_paper and mapped else ""
        notes = [f"{ds} {n}" for ds, by_method in collected.items() for n in missing_notes(by_method, columns)]
        missing = f"; scores of these runs over fewer pairs (Table 4): {'; '.join(notes)}" if notes else ""
        cap = caption(f"Table 5 — methods × datasets{model}: mean ± std over pairs, CS = CLIP score, "
                      f"CDS = CLIP dir. sim., editing time = s/image (warm){vs}{missing}", clip_name)
        result["table5"] = (t, write_table(t, root, "table5", cap, index_label="method"), cap)
        if compare_paper:
            pt = paper_table5(paper5)
            pcap = (f"The paper's Table 5 — {paper_role(paper5, model_name, mapped)}; times: s/image on its "
                    "hardware, comparable with ours only as measured on the same hardware")
            result["paper"] = (pt, write_table(pt, root, "table5_paper", pcap, index_label="method"), pcap)
    elif collected and compare_paper:
        pt = paper_table4(paper4)
        same_data = bool(set(collected) & set(paper4_sets))
        pcap = f"The paper's Table 4 (CS, CDS of P2P and FPE) — {paper_role(paper4, model_name, same_data)}"
        result["paper"] = (pt, write_table(pt, root, "table4_paper", pcap, index_label="dataset"), pcap)
    return result
