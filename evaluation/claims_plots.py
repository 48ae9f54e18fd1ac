"""Figures of the claims report (``experiment=claims``): probe accuracy per layer, the Fig. 4 layer sweep
as curves, the Fig. 5 token edits; every point a mean with its confidence interval as an error bar."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sdattn.files import atomic_save

from .claims import Interval


def _figure(**kw):
    """A matplotlib figure without pyplot: no global backend is switched (a notebook's stays as it is)."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def _errorbar(ax, xs, intervals: Sequence[Interval], scale: float = 1.0, **kw):
    """Points at the means, bars to the interval (infinite bounds drawn as no bar)."""
    means = [i.mean * scale for i in intervals]
    lo = [(i.mean - i.lo) * scale if i.lo > float("-inf") else 0.0 for i in intervals]
    hi = [(i.hi - i.mean) * scale if i.hi < float("inf") else 0.0 for i in intervals]
    ax.errorbar(xs, means, yerr=[lo, hi], capsize=3, marker="o", **kw)


def _save(fig, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    return path


def probe_figure(per_layer: Mapping[str, Mapping[int, Interval]], chance: float, path: Path, title: str,
                 dpi: int = 120) -> Path:
    """Accuracy (%) vs layer index, one line per feature set (``per_layer[name][layer index]``)."""
    fig = _figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    for name, by_layer in per_layer.items():
        idx = sorted(by_layer)
        _errorbar(ax, idx, [by_layer[i] for i in idx], scale=100, label=name)
    ax.axhline(chance * 100, color="gray", linestyle="--", label="chance")
    ax.set(xlabel="layer (this model's numbering, per kind)", ylabel="test accuracy %", title=title, ylim=(0, 105))
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path, dpi)


def sweep_figure(panels: Mapping[str, Mapping[str, Mapping[str, Interval]]], baseline: Mapping[str, Interval],
                 path: Path, title: str, dpi: int = 120) -> Path:
    """One panel per kind (``panels[kind][range label][metric]``): each metric vs layer range, with the
    unedited target generation's value (``baseline[metric]``) as a dashed line."""
    fig = _figure(figsize=(4.6 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], panels.items()):
        labels = list(rows)
        xs = list(range(len(labels)))
        for k, metric in enumerate(baseline):
            color = f"C{k}"
            _errorbar(ax, xs, [rows[x][metric] for x in labels], label=metric, color=color)
            ax.axhline(baseline[metric].mean, color=color, linestyle="--", linewidth=1,
                       label=f"{metric}, target (no edit)")
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=7)
        ax.set(title=f"{kind}-attention maps replaced", ylim=(-0.05, 1.05), xlabel="layer range")
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def bars_figure(rows: Mapping[str, Mapping[str, Interval]], path: Path, title: str, dpi: int = 120) -> Path:
    """Grouped bars: one group per row label (``rows[label][metric]``), one bar per metric."""
    labels = list(rows)
    metrics = list(next(iter(rows.values())))
    width = 0.8 / len(metrics)
    fig = _figure(figsize=(1.2 * len(labels) + 2, 3.4))
    ax = fig.subplots()
    for k, metric in enumerate(metrics):
        xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(labels))]
        ivs = [rows[x][metric] for x in labels]
        ax.bar(xs, [i.mean for i in ivs], width=width, label=metric, color=f"C{k}", alpha=0.7)
        _errorbar(ax, xs, ivs, color="black", linestyle="none", markersize=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set(ylim=(0, 1.05), title=title)
    ax.legend(fontsize=7)
    return _save(fig, path, dpi)
