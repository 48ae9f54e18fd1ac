"""Probe results → the paper's table layout (class rows × layer columns + Avg); written as CSV,
Markdown and LaTeX by :func:`sdattn.tables.write_table`. On a model with SD 1.5's layer layout the paper's
numbers (``datasets/paper/table{1,2,3}.yaml``) go beside ours in the cells both tables have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sdattn.tables import write_table


def accuracy_table(
    results: dict[str, list[np.ndarray]],
    classes: list[str],
    overall: dict[str, list[float]],
    control: dict[str, list[float]] | None = None,
    chance: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and std tables in %, rows = classes + ``overall`` (+ ``shuffled-label control``,
    ``chance``), columns = layers + ``Avg``.

    ``results[layer]``: per-seed arrays (C,) of per-class accuracy; ``overall[layer]``: per-seed
    test accuracy; ``control[layer]``: per-seed accuracy of the shuffled-label probe.
    """
    layers = list(results)
    mean = pd.DataFrame({layer: np.mean(results[layer], 0) * 100 for layer in layers}, index=classes)
    std = pd.DataFrame({layer: np.std(results[layer], 0) * 100 for layer in layers}, index=classes)
    mean.loc["overall"] = [np.mean(overall[layer]) * 100 for layer in layers]
    std.loc["overall"] = [np.std(overall[layer]) * 100 for layer in layers]
    if control is not None:
        mean.loc["shuffled-label control"] = [np.mean(control[layer]) * 100 for layer in layers]
        std.loc["shuffled-label control"] = [np.std(control[layer]) * 100 for layer in layers]
    mean["Avg"] = mean[layers].mean(1)
    std["Avg"] = std[layers].mean(1)
    if chance is not None:
        mean.loc["chance"] = chance * 100
        std.loc["chance"] = 0.0
    return mean, std


def formatted(mean: pd.DataFrame, std: pd.DataFrame, with_std: bool) -> pd.DataFrame:
    """Strings "81.2" or "81.2 ± 3.4"."""
    if not with_std:
        return mean.map(lambda v: f"{v:.1f}")
    return pd.DataFrame(
        [[f"{m:.1f} ± {s:.1f}" for m, s in zip(mr, sr)] for mr, sr in zip(mean.values, std.values)],
        index=mean.index, columns=mean.columns,
    )


# SD 1.5's attention layers of each kind in run order: (block, latent side ÷ the layer's query side). A model whose
# layers have this layout is numbered as the paper numbers its layers (Tables 1-3), whatever its size or weights.
SD1X_LAYOUT = ((("down.0", 1),) * 2 + (("down.1", 2),) * 2 + (("down.2", 4),) * 2 + (("mid", 8),)
               + (("up.1", 4),) * 3 + (("up.2", 2),) * 3 + (("up.3", 1),) * 3)


def sd1x_layout(layers) -> bool:
    """Whether ``layers`` (``sdattn.layers.enumerate_layers``) have SD 1.5's layout in both kinds, so a layer
    number means the same layer as in the paper's tables."""
    for kind in ("self", "cross"):
        mine = [x for x in layers if x.kind == kind]
        if not mine:
            return False
        side = max(x.height for x in mine)
        if tuple((x.block, side // x.height) for x in mine) != SD1X_LAYOUT:
            return False
    return True


def paper_probe_table(paper_dir: str | Path, probe: str, token: str | None = None) -> dict | None:
    """The paper's table for our probe ``probe`` (``configs/probe/<probe>.yaml``'s name) and, for Table 3, the
    probed ``token``: {"table", "model", "model_configs", "layers", "classes": {class: {layer | "Avg": fraction}}}
    from ``datasets/paper/table<n>.yaml``, or None when no table lists the probe (or has the token)."""
    for path in sorted(Path(paper_dir).glob("table*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if probe not in (doc.get("probes") or []):
            continue
        classes = (doc.get("tokens") or {}).get(token) if "tokens" in doc else doc.get("classes")
        if classes:
            return {**{k: doc.get(k) for k in ("table", "model", "model_configs", "layers")}, "classes": classes}
    return None


def beside_paper(table: pd.DataFrame, paper: dict) -> pd.DataFrame:
    """``table`` (formatted cells, rows = classes, columns ``L<n>`` + ``Avg``) with the paper's value in % in each
    cell it shares — same class, same layer number — as "ours (paper)"; its Avg only when our columns are its layers."""
    out = table.copy()
    layers = [c for c in table.columns if c != "Avg"]
    same_columns = layers == [f"L{n}" for n in paper["layers"]]
    for cls, values in paper["classes"].items():
        if cls not in out.index:
            continue
        for col in out.columns:
            key = "Avg" if col == "Avg" else int(col[1:]) if col[1:].isdigit() else None
            if key in values and (key != "Avg" or same_columns):
                out.loc[cls, col] = f"{out.loc[cls, col]} ({values[key] * 100:.0f})"
    return out


def paper_caption(paper: dict, model_name: str) -> str:
    """How a probe table names the paper's numbers beside ours."""
    role = ("the target of this run" if model_name in (paper.get("model_configs") or [])
            else f"a different model's reference, not a target for model {model_name}")
    return f"(n) = Liu et al. 2024 Table {paper['table']} ({paper['model']}), %, same class and layer: {role}"


def write_probe_tables(mean: pd.DataFrame, std: pd.DataFrame, out: str | Path, stem: str, caption: str,
                       with_std: bool, paper: dict | None, model_name: str) -> tuple[dict, str]:
    """Write one probe table (``<stem>.csv/md/tex``: "mean ± std" cells with ``with_std``) and, with the
    paper's table (:func:`paper_probe_table`), ``<stem>_vs_paper`` with its numbers in the cells we share.
    → ({stem: files, ...}, the table to print with its caption, Markdown)."""
    table = formatted(mean, std, with_std=with_std)
    files = {stem: write_table(table, out, stem, caption)}
    shown, shown_caption = table, caption
    if paper is not None:  # the paper's numbers in the cells we share (same class, same layer number)
        shown, shown_caption = beside_paper(table, paper), f"{caption}; {paper_caption(paper, model_name)}"
        files[f"{stem}_vs_paper"] = write_table(shown, out, f"{stem}_vs_paper", shown_caption)
    return files, f"{shown_caption}\n{shown.to_markdown()}"
