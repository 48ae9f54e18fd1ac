"""Benchmark tables: Table 4 (rows = methods, per dataset) and Table 5 (rows = methods × columns =
dataset × {CLIP score, CLIP dir. sim.}) from the record store, written as CSV, Markdown and LaTeX by
the project's one table writer (:func:`sdattn.tables.write_table`)::

    <root>/<data>/table4.{csv,md,tex}     rows = methods of that dataset
    <root>/table5.{csv,md,tex}            rows = methods × columns = datasets
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from sdattn.tables import write_table

from .metric_models import TINY_CLIP
from .records import collect

COLUMNS = {  # metric key → paper header (Table 4); the columns after Time are our additions
    "clip_score": "CLIP score ↑",
    "clip_directional": "CLIP dir. sim. ↑",
    "time_s": "Time (s) ↓",
    "psnr": "PSNR ↑",
    "ssim": "SSIM ↑",
    "structure": "Structure dist. ↓",
    "toy_edit_ok": "Edit correct ↑",
    "toy_mask_iou": "Mask IoU ↑",
}
OPTIONAL = ("structure", "toy_edit_ok", "toy_mask_iou")  # columns shown only when some row has them
REL_FPE = "Time rel. FPE"
TABLE5_METRICS = ("clip_score", "clip_directional")


def mean_std(values: list) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None], dtype=float)
    return (float("nan"), float("nan")) if v.size == 0 else (float(v.mean()), float(v.std()))


def cell(mean: float, std: float, digits: int) -> str:
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


DIGITS = {"clip_score": 2, "clip_directional": 3, "time_s": 2, "psnr": 2, "ssim": 3, "structure": 4,
          "toy_edit_ok": 2, "toy_mask_iou": 2}


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


def table4(rows_by_method: dict[str, list[dict]]) -> pd.DataFrame:
    """Rows = methods; columns = the paper's (CLIP score, CLIP dir. sim., Time) + PSNR, SSIM (+ time
    relative to FPE, between rows timed in the same run, when FPE rows exist). Cells "mean ± std" over pairs."""
    data = {}
    present = [k for k in COLUMNS if k not in OPTIONAL
               or any(r.get(k) is not None for rows in rows_by_method.values() for r in rows)]
    for m in row_order(rows_by_method):
        rows = rows_by_method[m]
        cells = {COLUMNS[k]: cell(*mean_std([r.get(k) for r in rows]), DIGITS[k]) for k in present}
        if "fpe" in rows_by_method:
            cells[REL_FPE] = time_ratio(rows, rows_by_method["fpe"])
        cells["Pairs"] = str(len(rows))
        data[m] = cells
    return pd.DataFrame.from_dict(data, orient="index")


def table5(collected: dict[str, dict[str, list[dict]]]) -> pd.DataFrame:
    """Rows = methods; columns = "<dataset> <metric>" for CLIP score and CLIP dir. sim."""
    methods = row_order({m for d in collected.values() for m in d})
    data = {m: {} for m in methods}
    for ds in sorted(collected):
        for m in methods:
            rows = collected[ds].get(m)
            for k in TABLE5_METRICS:
                data[m][f"{ds} {COLUMNS[k]}"] = cell(*mean_std([r.get(k) for r in rows]), DIGITS[k]) if rows else "–"
    return pd.DataFrame.from_dict(data, orient="index")


def caption(what: str, clip_name: str) -> str:
    text = f"{what}; CLIP: {clip_name}"
    if clip_name == TINY_CLIP:
        text += " (seeded tiny random CLIP: smoke run, the numbers are meaningless)"
    return text


def write_tables(root: str | Path, clip_name: str, model_name: str = "", table5_too: bool = True) -> dict:
    """Aggregate everything under ``root`` scored with ``clip_name``; write Table 4 per dataset and (with
    ``table5_too``: the Table 5 experiment) Table 5 across datasets.
    Returns {"table4": {data: (DataFrame, paths, caption)}, "table5": (DataFrame, paths, caption) or None}."""
    root = Path(root)
    collected = collect(root, clip_name)
    result: dict = {"table4": {}, "table5": None}
    model = f", model {model_name}" if model_name else ""
    for ds, by_method in collected.items():
        t = table4(by_method)
        cap = caption(f"Table 4 — {ds}{model}: mean ± std over pairs, time = s/image (warm); {REL_FPE}: between "
                      "rows timed in the same run (– = not timed together)", clip_name)
        result["table4"][ds] = (t, write_table(t, root / ds, "table4", cap, index_label="method"), cap)
    if collected and table5_too:
        t = table5(collected)
        cap = caption(f"Table 5 — methods × datasets{model}: mean ± std over pairs", clip_name)
        result["table5"] = (t, write_table(t, root, "table5", cap, index_label="method"), cap)
    return result
