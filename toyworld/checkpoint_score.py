"""Score exported toy pipelines cheaply, to pick a training checkpoint (issue 25) without the full gates.

Per pipeline folder, in one row:

- **images**: colour and shape accuracy of samples of every colour × shape (``--per-combo`` each, the
  ``eval_toy`` prompts and pixel checker, fewer images);
- **probes** on "a <colour> car" (``--n-per-class`` images per colour, the claims' protocol of
  :mod:`toyworld.diagnose_tokens`: random splits by image seed, the project's probe settings): the colour
  word's map (Table 1: best layer and mean over layers), the map of "a" and of the noun (Table 3: mean
  over layers, claim (b)), and the start token's and the padding's share of the attention (SD: the start
  token takes most of it).

    python -m toyworld.checkpoint_score outputs/train_toy/pipelines/step_* [--n-per-class 10]

prints the table (markdown) and writes it to ``--out`` (CSV) when given. Small sizes: a proxy, not a gate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import OmegaConf

from sdattn.files import REPO_ROOT
from sdattn.settings import SETTINGS_FILE
from toyworld.diagnose_tokens import Positions, capture, probe_accuracy
from toyworld.evaluate import classify_image, eval_prompts, sample_images
from toyworld.model import load_pipeline
from toyworld.world import load_world

MAPS = {"colour word": "colour word: map", "a": "map", "noun": "noun: map"}


def image_accuracy(pipe, world, per_combo: int, steps: int, guidance: float, batch: int) -> dict[str, float]:
    """Colour and shape accuracy of ``per_combo`` × colours × shapes samples (seeds 0..), pixel-checked."""
    items = eval_prompts(world, per_combo)
    prompts = [world.make_prompt(c, s, b) for c, s, b in items]
    hits = []
    for i in range(0, len(items), batch):
        images = sample_images(pipe, prompts[i:i + batch], range(i, min(i + batch, len(items))), steps, guidance)
        for (c, s, _), im in zip(items[i:i + batch], images):
            pc, ps, _ = classify_image(im, world)
            hits.append((pc == c, ps == s))
    colour, shape = np.mean(hits, axis=0)
    return {"image colour %": 100 * colour, "image shape %": 100 * shape}


def probe_scores(pipe, n_per_class: int, test_per_class: int, splits: int, steps: int, guidance: float,
                 batch: int, family: str) -> dict[str, float]:
    fam = yaml.safe_load((REPO_ROOT / family).read_text())
    mlp = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "configs/probe/cross_attn.yaml").mlp)
    epochs = int(OmegaConf.load(REPO_ROOT / "configs/trainer/probe.yaml").max_epochs)
    classes = list(fam["classes"])
    prompts = [fam["template"].format(cls=c) for c in classes for _ in range(n_per_class)]
    seeds = [k for _ in classes for k in range(n_per_class)]
    y = np.repeat(np.arange(len(classes)), n_per_class)
    words = prompts[0].split()
    pos = Positions(article=1, colour=2, noun=3, end=1 + len(words))
    feats, layers = capture(pipe, prompts, seeds, steps, guidance, batch, pos)
    labels = [x.label for x in layers]
    out: dict[str, float] = {}
    for word, name in MAPS.items():
        acc = np.array([[probe_accuracy(feats[(x, name)], y, np.asarray(seeds), test_per_class, s, mlp, epochs)
                         for s in range(splits)] for x in labels]) * 100  # (layers, splits)
        per_layer = acc.mean(1)
        out[f"{word} mean %"] = per_layer.mean()
        if word == "colour word":
            best = int(per_layer.argmax())
            out["colour word best %"], out["best layer"] = per_layer[best], labels[best]
        if word == "a":  # claim (b): the upper bound of the mean over layers (t over splits)
            from scipy import stats

            m = acc.mean(0)
            out["a upper %"] = m.mean() + stats.t.ppf(0.975, splits - 1) * m.std(ddof=1) / np.sqrt(splits)
    mass = np.mean([feats[(x, "mass")].mean(0) for x in labels], axis=0)  # (L,) mean over layers
    out["start mass %"], out["padding mass %"] = 100 * mass[0], 100 * mass[pos.end + 1:].sum()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="exported pipeline folders")
    ap.add_argument("--family", default="datasets/probe/toy_color_car.yaml")
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=3)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--per-combo", type=int, default=1, help="images per colour × shape (0: no image check)")
    ap.add_argument("--batch", type=int, default=35)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = load_world(None)
    rows = {}
    for model in args.models:
        folder = Path(model) if Path(model).is_absolute() else REPO_ROOT / model
        settings = yaml.safe_load((folder / SETTINGS_FILE).read_text())
        steps, guidance = int(settings["steps"]), float(settings["guidance_scale"])
        pipe = load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        row = image_accuracy(pipe, world, args.per_combo, steps, guidance, args.batch) if args.per_combo else {}
        row.update(probe_scores(pipe, args.n_per_class, args.test_per_class, args.splits, steps, guidance,
                                args.batch, args.family))
        rows[model] = row
        print(pd.Series(row).to_string(), flush=True)
    table = pd.DataFrame(rows).T
    print(table.round(1).to_markdown())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out)


if __name__ == "__main__":
    main()
