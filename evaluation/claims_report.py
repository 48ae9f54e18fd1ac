"""The claims report (``experiment=claims``): ``claims.md`` — one verdict line per claim, then a section per
measurement with its table and figures (:mod:`evaluation.claims_plots`) — and the edit grids."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from editing.grid import labelled_grid
from sdattn.files import atomic_save, atomic_write_text

from .claims import Claim, Interval
from .paper_claims import interval_table


def md_table(df: pd.DataFrame, index: str) -> str:
    return df.rename_axis(index).to_markdown()


def save_grid(grid_rows: list, path: Path, cell: int) -> None:
    """The edit grid of :func:`~evaluation.paper_claims.run_edits` (rows: variants) as a PNG."""
    img = labelled_grid([r for _, r in grid_rows], cell=cell, row_labels=[label for label, _ in grid_rows])
    atomic_save(path, lambda tmp: img.save(tmp, format="PNG"))


def probe_section(probes: dict, table: pd.DataFrame, n_per_class: int, n_seeds: int, level: float) -> list[str]:
    """Claims (a), (b): the probe table (:func:`~evaluation.paper_claims.probe_table`) and figure."""
    return ["## (a), (b): probing (Tables 1–3)", "",
            f"{probes['n_images']} images ({n_per_class} per colour), {probes['n_test']} test images "
            f"per split, {n_seeds} probe seeds; test accuracy, mean [{level:.0%} t-interval].",
            "", md_table(table, "probed maps"), "", "![probe accuracy per layer](probe_layers.png)", ""]


def sweep_section(ivs: dict[str, dict[str, Interval]], df: pd.DataFrame, pairs: list, seeds: list[int],
                  cross_steps, self_steps, middle_spec, middle_layers: list[int], middle: str,
                  grid_cases: int) -> list[str]:
    """Claim (c): the layer sweep's table (rows: variants), curves and edit grid."""
    return ["## (c): the layer sweep (Fig. 4)", "",
            f"Pairs {pairs}, noise seeds {seeds}: {len(pairs) * len(seeds)} cases per row. Cross maps replaced on "
            f"{cross_steps} of the steps, self maps on {self_steps}; middle self layers = "
            f"`{middle_spec}` → layers {middle_layers} ({middle}). Edit correct: the target's colour and "
            "shape found in the edited image; mask IoU: object masks of source and edited (1 = layout kept; a case "
            "whose source or edited image the checker cannot read has none: left out, counted). "
            "Mean [bootstrap interval].", "",
            md_table(interval_table(ivs, df), "rows"), "", "![layer sweep](layer_sweep.png)", "",
            f"![edits of the sweep (rows: variants; columns: the first {grid_cases} cases, pair by "
            "pair)](sweep_grid.png)", ""]


def token_section(ivs: dict[str, dict[str, Interval]], df: pd.DataFrame, source_prompt: str, target_prompt: str,
                  layers, steps, seeds: list[int]) -> list[str]:
    """Claim (d): the token edits' table, bars and edit grid."""
    return ["## (d): token edits (Fig. 5)", "",
            f"`{source_prompt}` → `{target_prompt}`, cross maps of the `{layers}` layers on {steps} of the "
            f"steps, noise seeds {seeds}. Mean [bootstrap interval].",
            "", md_table(interval_table(ivs, df), "rows"), "", "![token edits](token_edits.png)", "",
            "![token edit grid](token_grid.png)", ""]


def write_report(out: Path, model_name: str, steps: int, guidance_scale: float, level: float, n_probe_seeds: int,
                 n_boot: int, claims: list[Claim], sections: list[str], seconds: float) -> Path:
    """``claims.md``: how it was measured, one row per claim (verdict, checks), then ``sections``."""
    lines = [f"# Claims of Liu et al. (CVPR 2024) on model `{model_name}`", "",
             f"`python -m experiments.run experiment=claims model.path=...`: {steps} steps, guidance "
             f"{guidance_scale}; {level:.0%} intervals — probe accuracies: Student-t over "
             f"{n_probe_seeds} probe seeds (each its own random train/test split by image and its own "
             f"initialisation); edits: percentile bootstrap ({n_boot} resamples) over (prompt pair, "
             f"noise seed) cases, differences paired by case. Run time {seconds:.0f} s.", "",
             "| claim | verdict | checks |", "|---|---|---|"]
    for cl in claims:
        detail = cl.skip_reason if cl.skip_reason is not None else "<br>".join(x.format() for x in cl.checks)
        lines.append(f"| ({cl.key}) {cl.title} | **{cl.verdict}** | {detail} |")
    path = out / "claims.md"
    atomic_write_text(path, "\n".join(lines + [""] + sections) + "\n")
    return path
