"""The toy world's scores of an edit, read by the renderer's pixel checker
(:func:`toyworld.evaluate.classify_image`). One definition each, one key name per score — ``edit_ok`` and
``mask_iou`` — for the benchmark's records (the ``toy_edit`` metric, ``configs/metric/toy_edit.yaml``), the
claims (``claims.checkers``) and ``experiment=eval_toy_edit``:

- an image is **unreadable** when the checker finds no object in it: no foreground, or an object mask left
  empty once the world's outline ring is taken off;
- ``mask_iou`` = |S ∩ E| / |S ∪ E| of the object masks of source and edited (1 = layout kept), and
  **None — missing, never 0 — when either image is unreadable**: the union is then not two objects' and
  the ratio says nothing about the layout (both empty: 0 / 0). Tables and claims count such pairs apart;
- ``edit_ok`` = 1 when the edited image shows the target's colour and shape, else 0 (an unreadable edited
  image shows no target: 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .evaluate import classify_image
from .world import World, load_world

EDIT_OK, MASK_IOU = "edit_ok", "mask_iou"


@dataclass(frozen=True)
class Reading:
    """What the checker reads in one image: colour and shape names (None: no object) and the object mask."""

    color: str | None
    shape: str | None
    mask: np.ndarray  # (H, W) bool

    @property
    def readable(self) -> bool:
        return self.color is not None and bool(self.mask.any())


def read_image(image, world: World | None = None) -> Reading:
    """The checker's reading of ``image`` ((3, H, W) / (1, 3, H, W) in [0, 1], or anything
    :func:`toyworld.evaluate.to_uint8` takes)."""
    return Reading(*classify_image(image, world))


def mask_iou(a: Reading, b: Reading) -> float | None:
    """IoU of the two object masks; None when either image is unreadable."""
    if not (a.readable and b.readable):
        return None
    return float((a.mask & b.mask).sum() / (a.mask | b.mask).sum())


def edit_scores(source: torch.Tensor, edited: torch.Tensor, target: dict, world: World | None = None) -> dict:
    """``{"edit_ok": 0/1, "mask_iou": IoU or None}`` of an edit whose ``target`` is {color, shape, ...};
    source, edited: (1, 3, H, W) in [0, 1]."""
    s, e = read_image(source[0], world), read_image(edited[0], world)
    return {EDIT_OK: float(e.readable and e.color == target["color"] and e.shape == target["shape"]),
            MASK_IOU: mask_iou(s, e)}


def toy_edit_scores(example, source: torch.Tensor, edited: torch.Tensor, grammar: str | None = None) -> dict:
    """The ``toy_edit`` metric: :func:`edit_scores` for pairs that carry the world's ground truth
    (``example.extra["target"]``: the toy datasets); {} for any other pair."""
    if "target" not in example.extra:
        return {}
    return edit_scores(source, edited, example.extra["target"], load_world(grammar))


def prompt_scores(source_prompt: str, target_prompt: str, source: torch.Tensor, edited: torch.Tensor) -> dict:
    """:func:`edit_scores` of an edit known only by its prompts (the target's colour and shape read from
    ``target_prompt`` by the world's grammar): the claims' checker."""
    world = load_world()
    return edit_scores(source, edited, world.parse_prompt(target_prompt), world)
