"""FPE colour edits on the toy model, measured against the toy world's pixel checker (:mod:`toyworld.scores`):
foreground-mask IoU(source, edited) vs IoU(source, plain target generation from the same noise)
(mean and median over the pairs the checker can read, with the count of those it cannot), the edited
image's colour accuracy, whether the shape survived, and the same for the README's example edit
(``toy_edit.example``). FPE's settings: ``configs/method/fpe.yaml``. Results, not gates."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from editing.grid import labelled_grid
from editing.methods import Pair, build_method
from experiments.common import load_model, output_dir, plain
from sdattn.sampling import sample
from toyworld.scores import mask_iou, read_image
from toyworld.world import load_world


def edit_pairs(colors: list[str], shapes: list[str], n: int, seed: int) -> list[tuple[str, str, str, int]]:
    """n (source colour, target colour, shape, noise seed) tuples, drawn reproducibly."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c1, c2 = rng.sample(colors, 2)
        out.append((c1, c2, rng.choice(shapes), seed + i))
    return out


def score_edit(pipe, world, fpe, sampling: dict, src: str, tgt: str, seed: int) -> tuple[dict, list]:
    """One FPE edit and the plain target from the same noise, checked: (row, grid row). IoUs are None
    where the checker cannot read an image."""
    source, edited = fpe(pipe, Pair(src, tgt), seed)
    unedited = sample(pipe, [tgt], seeds=[seed], progress=False, **sampling).images  # the target alone, same noise
    s, e, p = (read_image(x[0], world) for x in (source, edited, unedited))
    c1, c2 = world.parse_prompt(src)["color"], world.parse_prompt(tgt)["color"]
    row = {"source": src, "target": tgt, "seed": seed, "iou_edit": mask_iou(s, e), "iou_plain": mask_iou(s, p),
           "edit_color_ok": e.color == c2, "plain_color_ok": p.color == c2, "edit_shape_kept": e.shape == s.shape,
           "plain_shape_kept": p.shape == s.shape, "source_color_ok": s.color == c1}
    grid = [(source[0], src), (edited[0], f"FPE: {c2}"), (unedited[0], f"plain: {c2}")]
    return row, grid


def run(cfg: DictConfig) -> dict:
    t = cfg.toy_edit
    world = load_world(t.get("grammar"))
    _, fpe = build_method(cfg.method)
    m = plain(cfg.method)
    sampling = {"num_inference_steps": int(m["num_inference_steps"]), "guidance_scale": float(m["guidance_scale"])}
    pipe = load_model(cfg)
    rows, grid = [], []
    for c1, c2, shape, seed in edit_pairs(list(t.colors or world.colors), list(t.shapes or world.shapes), t.n,
                                          cfg.seed):
        row, g = score_edit(pipe, world, fpe, sampling, world.make_prompt(c1, shape), world.make_prompt(c2, shape),
                            seed)
        rows.append(row)
        if len(grid) < t.grid_rows:
            grid.append(g)
    df = pd.DataFrame(rows)
    out = output_dir(cfg)
    df.to_csv(out / "toy_edit_pairs.csv", index=False)
    labelled_grid(grid, cell=96).save(out / "toy_edit_grid.png")
    iou = {k: df[k].astype(float) for k in ("iou_edit", "iou_plain")}  # None → NaN: left out of means, counted

    def stat(x: float) -> float | None:  # None when no pair was readable
        return None if np.isnan(x) else float(x)

    metrics = {
        "n_pairs": len(df), "layers": str(m["layers"]), "self_replace_steps": m["self_replace_steps"],
        "iou_source_vs_fpe": stat(iou["iou_edit"].mean()),
        "iou_source_vs_plain_target": stat(iou["iou_plain"].mean()),
        "iou_source_vs_fpe_median": stat(iou["iou_edit"].median()),
        "iou_source_vs_plain_target_median": stat(iou["iou_plain"].median()),
        "iou_unreadable_fpe": int(iou["iou_edit"].isna().sum()),
        "iou_unreadable_plain_target": int(iou["iou_plain"].isna().sum()),
        "fpe_color_accuracy": float(df.edit_color_ok.mean()), "plain_color_accuracy": float(df.plain_color_ok.mean()),
        "fpe_shape_kept": float(df.edit_shape_kept.mean()), "plain_shape_kept": float(df.plain_shape_kept.mean()),
        "source_color_accuracy": float(df.source_color_ok.mean()),
    }
    if t.get("example"):
        src, tgt, seed = t.example
        row, g = score_edit(pipe, world, fpe, sampling, str(src), str(tgt), int(seed))
        labelled_grid([g], cell=128).save(out / "toy_edit_example.png")
        metrics["example"] = {k: (bool(v) if isinstance(v, (bool, np.bool_)) else v) for k, v in row.items()}
    (out / "toy_edit_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return metrics
