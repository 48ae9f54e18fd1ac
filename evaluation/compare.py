"""Several editors on one pair, side by side (the paper's Fig. 8): every method on the same pair, seed and
image, DDIM inversions shared where methods invert alike (:func:`editing.inversion.shared_inversions`),
each timed and scored with the benchmark's CLIP (CLIP score of the edited image against the target prompt,
directional similarity of source → edited against source → target prompt). Written as ``compare.png``
(source, target prompt, one column per method with its time and scores under it), ``compare.json`` and
``compare.md``, plus every method's own files in ``<method>/``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from editing.grid import comparison_grid
from editing.inversion import shared_inversions
from editing.methods import MethodRun, Pair, run_method, save_run
from sdattn.files import atomic_save, atomic_write_text

from .metrics import ClipMetrics

SAME_SOURCE_ATOL = 1 / 255  # sources within one 8-bit level count as the same image


def compare_methods(pipe, editors: Sequence[tuple[str, Callable]], pair: Pair, seed: int, image=None,
                    warmup: bool = False) -> list[MethodRun]:
    """Each ``(name, edit)`` on ``pair`` with ``seed`` (and ``image`` (1, 3, H, W) for a real-image edit),
    in order; an inversion one method computed is reused by the next that inverts alike (its cost counted
    in both times)."""
    with shared_inversions():
        return [run_method(pipe, name, edit, pair, seed, image, warmup) for name, edit in editors]


def comparison_rows(runs: Sequence[MethodRun], pair: Pair, clip: ClipMetrics | None) -> list[dict]:
    """One row per method: time (s), of which inversions shared with an earlier method, the CLIP score and
    directional similarity (None without ``clip``), and whether its source is the first method's."""
    rows = []
    for run in runs:
        row = {"method": run.name, "time_s": run.seconds, "shared_inversion_s": run.shared_inversion_s,
               "same_source": bool((run.source - runs[0].source).abs().max() <= SAME_SOURCE_ATOL),
               "clip_score": None, "clip_directional": None}
        if clip is not None:
            score, directional = clip.pair_scores(run.source, run.edited, [pair.source_prompt], [pair.target_prompt])
            row.update(clip_score=float(score[0]), clip_directional=float(directional[0]))
        rows.append(row)
    return rows


def caption_lines(row: dict) -> list[str]:
    """The text under a method's column: its time and scores."""
    shared = " (inversion shared)" if row["shared_inversion_s"] > 0 else ""
    lines = [f"{row['time_s']:.2f} s{shared}"]
    if row["clip_score"] is not None:
        lines.append(f"CLIP {row['clip_score']:.2f}  dir. {row['clip_directional']:.3f}")
    if not row["same_source"]:
        lines.append("(its own source)")
    return lines


def write_comparison(out_dir: str | Path, runs: Sequence[MethodRun], rows: Sequence[dict], pair: Pair,
                     source_caption: str, settings: dict, cell: int = 256) -> dict[str, Path]:
    """``<method>/`` (source, edited, grid, latents) per method, then ``compare.png``, ``compare.json``
    (``settings``: what produced it, e.g. seed, image, CLIP, per-method settings) and ``compare.md``."""
    out = Path(out_dir)
    files = {}
    for run in runs:
        for key, path in save_run(run, out / run.name, (source_caption, pair.target_prompt), cell).items():
            files[f"{run.name}/{key}"] = path
    timing = "warm (edit.warmup)" if settings.get("warmup") else "cold (first run of each)"
    grid = comparison_grid(runs[0].source, source_caption, pair.target_prompt,
                           [(run.name, run.edited, caption_lines(row)) for run, row in zip(runs, rows)], cell,
                           footer=f"times: {timing}")
    files["compare"] = atomic_save(out / "compare.png", lambda tmp: grid.save(tmp, format="PNG"))
    record = {"source_prompt": pair.source_prompt, "target_prompt": pair.target_prompt, **settings,
              "methods": list(rows)}
    files["json"] = atomic_write_text(out / "compare.json", json.dumps(record, indent=1, default=str))
    files["md"] = atomic_write_text(out / "compare.md", comparison_table(rows) + "\n")
    return files


def comparison_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table (time in s; CLIP score; CLIP directional similarity)."""
    df = pd.DataFrame(rows).set_index("method")[["time_s", "shared_inversion_s", "clip_score", "clip_directional"]]
    return df.to_markdown(floatfmt=".3f")
