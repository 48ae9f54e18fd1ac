"""Probe results → the paper's table layout (class rows × layer columns + Avg), written as
CSV, Markdown and LaTeX."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd


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


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}"}


def _latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text (cells are escaped by pandas, captions are not)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def write_table(table: pd.DataFrame, out_dir: str | Path, stem: str, caption: str = "",
                index_label: str = "class") -> dict[str, Path]:
    """Write ``stem.csv``, ``stem.md`` and ``stem.tex`` (rows named ``index_label``); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("csv", "md", "tex")}
    _atomic(paths["csv"], table.to_csv(index_label=index_label))
    _atomic(paths["md"], (f"**{caption}**\n\n" if caption else "") + table.to_markdown() + "\n")
    latex = table.to_latex(caption=_latex_escape(caption) or None, label=f"tab:{stem}", escape=True)
    _atomic(paths["tex"], latex)
    return paths
