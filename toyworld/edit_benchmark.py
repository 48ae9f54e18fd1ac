"""The toy world's edit benchmark: ``toy_edit`` pairs (a generated dataset, so Tables 4–5 run offline
on the shipped toy model and score with the shipped toy CLIP). The world's own check of an edit is the
``toy_edit`` metric (:mod:`toyworld.scores`, ``configs/metric/toy_edit.yaml``; evaluation never imports
toyworld).

Pairs are drawn from the toy grammar (``datasets/toy_world.yaml``) with a seeded generator:

- **colour edits**: ``"a red car in the park"`` → ``"a blue car in the park"`` (another colour);
- **shape edits**: ``"a red car in the park"`` → ``"a red star in the park"`` (another shape);

each in two image kinds, like the FPE benchmark's fake / real sets:

- **fake**: no image; source and target are generated from the pair's seed;
- **real**: the source is a toy-renderer image of the source prompt, written once as a PNG under
  ``data.root`` (rendered deterministically; an existing file is reused).

``toy_edit`` interleaves fake-colour, fake-shape, real-colour, real-shape, … so ``data.limit=4``
already covers every kind; ``toy_fake_edit`` / ``toy_real_edit`` hold one image kind each (the two
columns of Table 5 on the toy model). Every example carries its source/target specification in
``extra`` (``kind``, ``images``, ``source``, ``target``: colour, shape, background).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.datasets import EditExample, LoadedDataset, finish_dataset
from sdattn.errors import UserError
from sdattn.files import atomic_save

from .world import load_world

TOY_DATASETS = {"toy_edit": ("fake", "real"), "toy_fake_edit": ("fake",), "toy_real_edit": ("real",)}
EDIT_KINDS = ("color", "shape")


def write_png(image: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 → PNG at ``path``, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def object_spec(color: str, shape: str, background: str) -> dict:
    return {"color": color, "shape": shape, "background": background}


def toy_edit_pairs(world, pairs_per_kind: int, seed: int = 0, images=("fake", "real"),
                   root: str | Path | None = None) -> list:
    """Edit examples: ``pairs_per_kind`` for each (image kind, edit kind), interleaved.

    ``root`` is where the real-image sources are rendered (required when ``"real"`` is in ``images``).
    """
    if isinstance(pairs_per_kind, bool) or not isinstance(pairs_per_kind, int) or pairs_per_kind < 1:
        raise UserError(f"data.pairs_per_kind {pairs_per_kind!r} must be an integer >= 1")
    unknown = [k for k in images if k not in ("fake", "real")]
    if unknown:
        raise UserError(f"data.images {unknown} not allowed; use fake and/or real")
    if "real" in images and root is None:
        raise UserError("data.root is required for real toy edits: the folder the rendered sources are written to")
    colors, shapes, backgrounds = list(world.colors), list(world.shapes), list(world.backgrounds)
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(pairs_per_kind):
        for img_kind in ("fake", "real"):
            for edit in EDIT_KINDS:
                color, shape, bg = str(rng.choice(colors)), str(rng.choice(shapes)), str(rng.choice(backgrounds))
                if edit == "color":
                    target = (str(rng.choice([c for c in colors if c != color])), shape, bg)
                else:
                    target = (color, str(rng.choice([s for s in shapes if s != shape])), bg)
                render_seed = int(rng.integers(2**31))
                if img_kind not in images:
                    continue  # the draws above still happen: toy_fake_edit ⊂ toy_edit, pair for pair
                ex_id = f"{img_kind}_{edit}_{i:03d}"
                image_path = None
                if img_kind == "real":
                    image_path = str(Path(root) / f"{ex_id}.png")
                    if not Path(image_path).is_file():
                        write_png(world.render(color, shape, bg, seed=render_seed).image, Path(image_path))
                examples.append(EditExample(
                    id=ex_id, source_prompt=world.make_prompt(color, shape, bg),
                    target_prompt=world.make_prompt(*target), image_path=image_path, seed=seed + i,
                    extra={"kind": edit, "images": img_kind, "source": object_spec(color, shape, bg),
                           "target": object_spec(*target)}))
    return examples


def load_toy_edit(name: str, root: str | Path | None, limit: int | None, path: str | Path | None,
                  pairs_per_kind: int, seed: int) -> LoadedDataset:
    """A toy benchmark (``toy_edit`` / ``toy_fake_edit`` / ``toy_real_edit``; ``configs/data/toy_*.yaml``);
    ``path`` = grammar YAML (None: the default grammar), ``root`` = where real sources are rendered."""
    if name not in TOY_DATASETS:
        raise UserError(f"toy dataset {name!r} is not one of {', '.join(TOY_DATASETS)}")
    if path is not None and not Path(path).is_file():
        raise UserError(f"data.path {str(path)!r} (toy grammar YAML) does not exist")
    world = load_world(path)
    return finish_dataset(name, toy_edit_pairs(world, pairs_per_kind, seed, TOY_DATASETS[name], root), limit)
