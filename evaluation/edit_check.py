"""A model-agnostic check of one edit, for ``experiment=claims`` (claims (c), (d)) on any model:

- **edit correct** — CLIP zero-shot between the source and the target prompt (they differ only in the
  edited words): the edited image is closer to the target prompt than to the source prompt. The CLIP is the
  benchmark's CLIP of the model (``model.clip``: SD-1.x CLIP ViT-L/14, the toy's own CLIP). And the model
  itself still recognises the target prompt in the edited image (:mod:`evaluation.prompt_gain`): the target
  prompt's denoising gain on the edited image is at least ``min_prompt_gain`` × the source prompt's on the
  source image. CLIP zero-shot between "a black car" and "a pink car" sees the colour only; an edit that turned
  the car into a pink blob passes it, but the model gains nothing from "a pink car" on that blob.
- **layout kept** — IoU of two object masks the edited model itself draws, one on the source image and one
  on the edited image (``mask``):

  - ``noise`` (default): DiffEdit's mask (Couairon et al., ICLR 2023;
    :func:`editing.baselines.diffedit.diffedit_mask`): where the model's noise predictions for the source and
    the target prompt differ on the image noised to half the schedule — the region the edited words are
    about, i.e. the object.
  - ``cross_attention``: the edited words' cross-attention maps during a short DDIM inversion of the image
    with its own prompt, aggregated as DAAM does (Tang et al., ACL 2023): per layer averaged over steps and
    heads, upsampled to the latent's size and divided by its maximum, averaged over the layers, scaled to
    [0, 1], cut at ``mask_threshold``. On SD-like models the maps localise their words; the toy model's do
    not reliably (docs/toy_world.md), so ``noise`` is the default.

Same interface as the toy world's pixel checker (:func:`toyworld.scores.prompt_scores`):
``checker(source_prompt, target_prompt, source, edited) -> {"edit_ok": 0/1, "mask_iou": IoU}``.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from editing.baselines.diffedit import diffedit_mask
from editing.baselines.shape_guided import edited_tokens
from editing.inversion import ddim_invert
from editing.two_branch import model_layers
from sdattn.errors import UserError
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import encode_image, latent_size

from .metric_models import load_clip
from .prompt_gain import prompt_gain

MASKS = ("noise", "cross_attention")


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two 0/1 masks of one shape (0 when both are empty)."""
    a, b = a.bool(), b.bool()
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


class GenericEditChecker:
    """``edit_ok`` from CLIP zero-shot, ``mask_iou`` from the model's own object masks (module docstring).

    pipe: the model being edited; clip: ``metrics.clip`` name (hub id, folder, ``toy``, ``tiny-random``);
    num_inference_steps / guidance_scale: the model's sampling settings (``noise``: the timestep grid and the
    CFG of the predictions); mask_encode_strength, num_maps_per_mask, mask_thresholding_ratio: DiffEdit's
    (``noise``); mask_steps, mask_threshold: inversion steps and cut of the aggregated map
    (``cross_attention``); min_prompt_gain (None: CLIP alone), gain_timesteps, gain_draws, gain_batch: the
    prompt-gain test of edit correct (module docstring)."""

    def __init__(self, pipe, clip: str | None, num_inference_steps: int, guidance_scale: float,
                 mask: str = "noise", mask_encode_strength: float = 0.5, num_maps_per_mask: int = 10,
                 mask_thresholding_ratio: float = 3.0, mask_steps: int = 10, mask_threshold: float = 0.5,
                 min_prompt_gain: float | None = None, gain_timesteps: int = 9, gain_draws: int = 4,
                 gain_batch: int = 36):
        if mask not in MASKS or mask_steps < 1 or not 0 < mask_threshold < 1:
            raise UserError(f"edit checker: mask {mask!r} must be one of {list(MASKS)}, mask_steps {mask_steps} "
                            f"≥ 1 and mask_threshold {mask_threshold} in (0, 1)")
        if min(gain_timesteps, gain_draws, gain_batch) < 1:
            raise UserError(f"edit checker: gain_timesteps {gain_timesteps}, gain_draws {gain_draws} and "
                            f"gain_batch {gain_batch} must be ≥ 1")
        self.min_gain = None if min_prompt_gain is None else float(min_prompt_gain)
        self.gain_args = {"timesteps": int(gain_timesteps), "draws": int(gain_draws), "seed": 0,
                          "batch": int(gain_batch)}  # one noise seed: source and edited see the same draws
        self.pipe, self.clip, self.mask = pipe, load_clip(clip, device=pipe.device), mask
        self.steps, self.guidance = int(num_inference_steps), float(guidance_scale)
        self.diffedit = {"mask_encode_strength": mask_encode_strength, "num_maps_per_mask": num_maps_per_mask,
                         "mask_thresholding_ratio": mask_thresholding_ratio}
        self.mask_steps, self.mask_threshold = int(mask_steps), float(mask_threshold)
        self.layers = [x for x in model_layers(pipe) if x.kind == "cross"]
        self._masks: dict[tuple, torch.Tensor] = {}  # the source image recurs in every row of a case
        self._gains: dict[tuple, float] = {}
        self._latents: dict[str, torch.Tensor] = {}  # image hash -> (1, C, h, w)

    def clip_verdict(self, source_prompt: str, target_prompt: str, edited: torch.Tensor) -> float:
        """1.0 when CLIP puts ``edited`` (1, 3, H, W) closer to the target prompt than to the source."""
        image = F.normalize(self.clip.image_features(edited), dim=-1)  # (1, D)
        text = F.normalize(self.clip.text_features([source_prompt, target_prompt]), dim=-1)  # (2, D)
        sims = (image @ text.T)[0]
        return float(sims[1] > sims[0])

    def latent(self, image: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(key, latent) of ``image`` (1, 3, H, W): encoded once for its masks and its prompt gains."""
        key = hashlib.sha1(image.float().cpu().numpy().tobytes()).hexdigest()
        if key not in self._latents:
            self._latents[key] = encode_image(self.pipe, image)
        return key, self._latents[key]

    def gain(self, image: torch.Tensor, prompt: str) -> float:
        """The model's denoising gain from ``prompt`` on ``image`` (1, 3, H, W), cached per image and prompt."""
        key, z0 = self.latent(image)
        if (prompt, key) not in self._gains:
            self._gains[prompt, key] = prompt_gain(self.pipe, z0, prompt, **self.gain_args)
        return self._gains[prompt, key]

    def edit_correct(self, source_prompt: str, target_prompt: str, source: torch.Tensor,
                     edited: torch.Tensor) -> float:
        """1.0 when CLIP prefers the target prompt and the model recognises it (module docstring)."""
        if not self.clip_verdict(source_prompt, target_prompt, edited):
            return 0.0
        if self.min_gain is None:
            return 1.0
        return float(self.gain(edited, target_prompt) >= self.min_gain * self.gain(source, source_prompt))

    def object_mask(self, image: torch.Tensor, source_prompt: str, target_prompt: str, own_prompt: str) -> torch.Tensor:
        """(h, w) bool mask of the edited object in ``image`` (1, 3, H, W), cached per image and prompts."""
        image_key, z0 = self.latent(image)
        key = (source_prompt, target_prompt, own_prompt, image_key)
        if key not in self._masks:
            if self.mask == "noise":
                m = diffedit_mask(self.pipe, z0, source_prompt, target_prompt, 0, self.steps, self.guidance,
                                  **self.diffedit)[0, 0] > 0.5
            else:
                src, tgt, _ = edited_tokens(self.pipe.tokenizer, source_prompt, target_prompt)
                words = src if own_prompt == source_prompt else tgt
                m = self.attention_mask(z0, own_prompt, words or list(range(1, len(self.pipe.tokenizer(own_prompt)
                                                                                    .input_ids) - 1)))
            self._masks[key] = m
        return self._masks[key]

    def attention_mask(self, z0: torch.Tensor, prompt: str, positions: list[int]) -> torch.Tensor:
        """The ``cross_attention`` mask of the words at ``positions`` (module docstring) → (h, w) bool."""
        words = torch.zeros(1, 1, self.pipe.tokenizer.model_max_length)  # (1, T=1, L): the positions' sum
        words[0, 0, list(positions)] = 1.0
        rec = Recorder([Tap(self.layers, "probs", heads="mean", tokens=words, over_steps="mean")])
        with rec.installed(self.pipe.unet):
            ddim_invert(self.pipe, z0, prompt, self.mask_steps, progress=False)
        maps = []
        for layer in self.layers:  # each layer: mean over steps (recorded), to the latent's size, / its max
            m = rec["probs"][layer.label][:1].float().reshape(1, 1, layer.height, layer.width)
            m = F.interpolate(m, size=latent_size(self.pipe), mode="bilinear")
            maps.append(m[0, 0] / m.max().clamp_min(1e-12))
        m = torch.stack(maps).mean(0)
        return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12) > self.mask_threshold

    def __call__(self, source_prompt: str, target_prompt: str, source: torch.Tensor, edited: torch.Tensor) -> dict:
        iou = mask_iou(self.object_mask(source, source_prompt, target_prompt, source_prompt),
                       self.object_mask(edited, source_prompt, target_prompt, target_prompt))
        return {"edit_ok": self.edit_correct(source_prompt, target_prompt, source, edited), "mask_iou": iou}


def checker_agreement(first: list[dict], second: list[dict], iou_threshold: float = 0.5) -> dict:
    """How often two checkers agree on the same edits (``{"edit_ok", "mask_iou"}`` per edit, in one order):
    the share of edits with the same edit-correct verdict, the same layout verdict (IoU ≥ ``iou_threshold``
    on both sides or below it on both), and both at once. An edit whose IoU either checker could not read
    (None: no object found) has no layout verdict: ``layout`` and ``both`` are shares of the ``layout_n``
    edits both read, and ``unreadable`` counts the others."""
    if len(first) != len(second) or not first:
        raise ValueError(f"checker_agreement needs two equal, non-empty lists of scores ({len(first)}, {len(second)})")
    edit = [float(a["edit_ok"]) == float(b["edit_ok"]) for a, b in zip(first, second)]
    read = [a["mask_iou"] is not None and b["mask_iou"] is not None for a, b in zip(first, second)]
    layout = [r and (a["mask_iou"] >= iou_threshold) == (b["mask_iou"] >= iou_threshold)
              for a, b, r in zip(first, second, read)]
    n, n_read = len(first), sum(read)
    share = (lambda k: k / n_read) if n_read else (lambda k: None)
    return {"n": n, "edit_ok": sum(edit) / n, "layout": share(sum(layout)), "layout_n": n_read,
            "unreadable": n - n_read, "both": share(sum(e and ly for e, ly in zip(edit, layout)))}
