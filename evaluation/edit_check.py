"""A model-agnostic check of one edit, for ``experiment=claims`` (claims (c), (d)) on any model:

- **edit correct** — CLIP zero-shot between the source and the target prompt (they differ only in the
  edited words): 1 when the edited image is closer to the target prompt than to the source prompt. The
  CLIP is the benchmark's CLIP of the model (``model.clip``: SD-1.x CLIP ViT-L/14, the toy's own CLIP).
- **layout kept** — IoU of two object masks made from the model's own cross-attention: the source image
  with the source prompt's edited words, the edited image with the target prompt's, each from a short
  DDIM inversion of the image with its prompt. As DAAM (Tang et al., ACL 2023) aggregates them: each cross
  layer's map of the words, averaged over the inversion steps and heads, upsampled to the latent's size and
  divided by its maximum, then averaged over the layers; scaled to [0, 1] by its minimum and maximum and
  cut at ``mask_threshold``. (Shape-Guided Diffusion's mask, :func:`editing.baselines.shape_guided.attention_mask`,
  takes the 16² layers only and divides by the maximum: on the toy model, whose maps at 16² are weak and
  keep a floor everywhere, that marks nearly the whole image.)

Same interface as the toy world's pixel checker (:func:`toyworld.edit_benchmark.prompt_scores`):
``checker(source_prompt, target_prompt, source, edited) -> {"edit_ok": 0/1, "mask_iou": IoU}``.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from editing.baselines.shape_guided import WordMapCapture, edited_tokens
from editing.inversion import ddim_invert
from editing.two_branch import model_layers
from sdattn.errors import UserError
from sdattn.hooks import HookSet
from sdattn.sampling import encode_image, latent_size

from .metric_models import load_clip


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two 0/1 masks of one shape (0 when both are empty)."""
    a, b = a.bool(), b.bool()
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


class CrossAttentionEditChecker:
    """``edit_ok`` from CLIP zero-shot, ``mask_iou`` from cross-attention object masks (module docstring).

    pipe: the model being edited; clip: ``metrics.clip`` name (hub id, folder, ``toy``, ``tiny-random``);
    mask_steps: DDIM inversion steps per mask; mask_side: None = every cross layer (DAAM's aggregation), else
    only the cross layers of the side nearest it (e.g. 16: SD-1.x's 16² layers, P2P's choice); mask_threshold:
    of the aggregated map scaled to [0, 1]."""

    def __init__(self, pipe, clip: str | None, mask_steps: int = 10, mask_side: int | None = None,
                 mask_threshold: float = 0.5):
        if mask_steps < 1 or not 0 < mask_threshold < 1:
            raise UserError(f"edit checker: mask_steps {mask_steps} must be ≥ 1 and mask_threshold "
                            f"{mask_threshold} in (0, 1)")
        self.pipe, self.clip = pipe, load_clip(clip, device=pipe.device)
        self.mask_steps, self.mask_threshold = int(mask_steps), float(mask_threshold)
        cross = [x for x in model_layers(pipe) if x.kind == "cross"]
        if mask_side is not None:
            side = min({x.height for x in cross}, key=lambda s: (abs(s - mask_side), -s))
            cross = [x for x in cross if x.height == side]
        self.layers, self.size = cross, latent_size(pipe)
        self._masks: dict[tuple, torch.Tensor] = {}  # the source image recurs in every row of a case

    def edit_ok(self, source_prompt: str, target_prompt: str, edited: torch.Tensor) -> float:
        """1.0 when CLIP puts ``edited`` (1, 3, H, W) closer to the target prompt than to the source."""
        image = torch.nn.functional.normalize(self.clip.image_features(edited), dim=-1)  # (1, D)
        text = torch.nn.functional.normalize(self.clip.text_features([source_prompt, target_prompt]), dim=-1)
        sims = (image @ text.T)[0]  # (2,)
        return float(sims[1] > sims[0])

    def object_mask(self, image: torch.Tensor, prompt: str, positions: list[int]) -> torch.Tensor:
        """(h', w') 0/1 mask of the words at ``positions`` in ``image`` (1, 3, H, W), cached per image."""
        key = (prompt, tuple(positions), hashlib.sha1(image.float().cpu().numpy().tobytes()).hexdigest())
        if key not in self._masks:
            sinks: dict[str, list[torch.Tensor]] = {x.label: [] for x in self.layers}
            with HookSet(self.pipe.unet, self.layers,
                         lambda lay, st: WordMapCapture(lay, st, positions, sinks[lay.label])):
                ddim_invert(self.pipe, encode_image(self.pipe, image), prompt, self.mask_steps, progress=False)
            maps = []
            for layer_maps in sinks.values():  # each layer: mean over steps, to the latent's size, / its max
                m = F.interpolate(torch.stack(layer_maps).float().mean(0)[:1, None], size=self.size, mode="bilinear")
                maps.append(m[0, 0] / m.max().clamp_min(1e-12))
            m = torch.stack(maps).mean(0)  # (h, w)
            m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
            self._masks[key] = m > self.mask_threshold
        return self._masks[key]

    def __call__(self, source_prompt: str, target_prompt: str, source: torch.Tensor, edited: torch.Tensor) -> dict:
        src_pos, tgt_pos, _ = edited_tokens(self.pipe.tokenizer, source_prompt, target_prompt)
        if not src_pos or not tgt_pos:  # nothing differs on one side: the object is every word's
            src_pos = src_pos or _word_positions(self.pipe.tokenizer, source_prompt)
            tgt_pos = tgt_pos or _word_positions(self.pipe.tokenizer, target_prompt)
        iou = mask_iou(self.object_mask(source, source_prompt, src_pos),
                       self.object_mask(edited, target_prompt, tgt_pos))
        return {"edit_ok": self.edit_ok(source_prompt, target_prompt, edited), "mask_iou": iou}


def _word_positions(tokenizer, prompt: str) -> list[int]:
    """Positions of the prompt's tokens between the start and the end token."""
    return list(range(1, len(tokenizer(prompt).input_ids) - 1))


def checker_agreement(first: list[dict], second: list[dict], iou_threshold: float = 0.5) -> dict:
    """How often two checkers agree on the same edits (``{"edit_ok", "mask_iou"}`` per edit, in one order):
    the share of edits with the same edit-correct verdict, the same layout verdict (IoU ≥ ``iou_threshold``
    on both sides or below it on both), and both at once."""
    if len(first) != len(second) or not first:
        raise ValueError(f"checker_agreement needs two equal, non-empty lists of scores ({len(first)}, {len(second)})")
    edit = [float(a["edit_ok"]) == float(b["edit_ok"]) for a, b in zip(first, second)]
    layout = [(a["mask_iou"] >= iou_threshold) == (b["mask_iou"] >= iou_threshold) for a, b in zip(first, second)]
    n = len(first)
    return {"n": n, "edit_ok": sum(edit) / n, "layout": sum(layout) / n,
            "both": sum(e and ly for e, ly in zip(edit, layout)) / n}
