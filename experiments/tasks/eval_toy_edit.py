"""FPE colour edits on the toy model, measured against the toy world's pixel checker:
foreground-mask IoU(source, edited) vs IoU(source, plain target generation from the same noise)
(mean and median), the edited image's colour accuracy, whether the shape survived, and the same for
the README's example edit (``toy_edit.example``). Results, not gates."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from editing.fpe import fpe_generated
from editing.grid import labelled_grid
from experiments.common import load_model, output_dir, plain
from sdattn.sampling import sample
from toyworld.evaluate import classify_image
from toyworld.world import load_world


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def edit_pairs(colors: list[str], shapes: list[str], n: int, seed: int) -> list[tuple[str, str, str, int]]:
    """n (source colour, target colour, shape, noise seed) tuples, drawn reproducibly."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c1, c2 = rng.sample(colors, 2)
        out.append((c1, c2, rng.choice(shapes), seed + i))
    return out


def score_edit(pipe, world, src: str, tgt: str, seed: int, t) -> tuple[dict, list]:
    """One FPE edit and the plain target from the same noise, checked: (row, grid row)."""
    kw = dict(num_inference_steps=t.num_inference_steps, guidance_scale=t.guidance_scale, progress=False)
    edit = fpe_generated(pipe, src, tgt, seed, layers=plain(t.layers), self_replace_steps=t.self_replace_steps, **kw)
    unedited = sample(pipe, [tgt], seeds=[seed], **kw).images  # (1, 3, H, W): the target alone, same noise
    (sc, ss, sm), (ec, es, em), (pc, ps, pm) = (classify_image(x[0], world) for x in (
        edit.images["source"], edit.images["edited"], unedited))
    c1, c2 = world.parse_prompt(src)["color"], world.parse_prompt(tgt)["color"]
    row = {"source": src, "target": tgt, "seed": seed, "iou_edit": iou(sm, em), "iou_plain": iou(sm, pm),
           "edit_color_ok": ec == c2, "plain_color_ok": pc == c2, "edit_shape_kept": es == ss,
           "plain_shape_kept": ps == ss, "source_color_ok": sc == c1}
    grid = [(edit.images["source"][0], src), (edit.images["edited"][0], f"FPE: {c2}"),
            (unedited[0], f"plain: {c2}")]
    return row, grid


def run(cfg: DictConfig) -> dict:
    t = cfg.toy_edit
    world = load_world(t.get("grammar"))
    pipe = load_model(cfg)
    rows, grid = [], []
    for c1, c2, shape, seed in edit_pairs(list(t.colors or world.colors), list(t.shapes or world.shapes), t.n,
                                          cfg.seed):
        row, g = score_edit(pipe, world, world.make_prompt(c1, shape), world.make_prompt(c2, shape), seed, t)
        rows.append(row)
        if len(grid) < t.grid_rows:
            grid.append(g)
    df = pd.DataFrame(rows)
    out = output_dir(cfg)
    df.to_csv(out / "toy_edit_pairs.csv", index=False)
    labelled_grid(grid, cell=96).save(out / "toy_edit_grid.png")
    metrics = {
        "n_pairs": len(df), "layers": str(plain(t.layers)), "self_replace_steps": t.self_replace_steps,
        "iou_source_vs_fpe": float(df.iou_edit.mean()), "iou_source_vs_plain_target": float(df.iou_plain.mean()),
        "iou_source_vs_fpe_median": float(df.iou_edit.median()),
        "iou_source_vs_plain_target_median": float(df.iou_plain.median()),
        "fpe_color_accuracy": float(df.edit_color_ok.mean()), "plain_color_accuracy": float(df.plain_color_ok.mean()),
        "fpe_shape_kept": float(df.edit_shape_kept.mean()), "plain_shape_kept": float(df.plain_shape_kept.mean()),
        "source_color_accuracy": float(df.source_color_ok.mean()),
    }
    if t.get("example"):
        src, tgt, seed = t.example
        row, g = score_edit(pipe, world, str(src), str(tgt), int(seed), t)
        labelled_grid([g], cell=128).save(out / "toy_edit_example.png")
        metrics["example"] = {k: (bool(v) if isinstance(v, (bool, np.bool_)) else v) for k, v in row.items()}
    (out / "toy_edit_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return metrics
