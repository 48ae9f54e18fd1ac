"""Probe results → the paper's table layout (class rows × layer columns + Avg); written as CSV,
Markdown and LaTeX by :func:`sdattn.tables.write_table`."""

from __future__ import annotations

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
