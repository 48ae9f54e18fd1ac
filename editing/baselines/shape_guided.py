"""Shape-Guided Diffusion (Park et al., "Shape-Guided Diffusion with Inside-Outside Attention", WACV 2024)
on the shared hook layer, following shape-guided-diffusion/shape-guided-diffusion (``utils.py``,
``shape_guided_diffusion.py``): real images only, as in Liu et al.'s Table 5.

Inside-outside attention on every attention layer, every call, both CFG rows, at the layer's resolution
(``obj`` = 1 on the object, 0 on the background; no renormalisation after the edits):

- cross-attention: the columns of the object tokens are kept only on object pixels, the others only on
  background pixels, each × ``cross_attn_scale``; tokens equal in the inversion and edit prompts keep
  scale 1; the start token's column is zeroed;
- self-attention: weights × ((same_region − 1)·``self_attn_scale`` + 1): scale 1 zeroes every weight
  across the mask boundary.

Procedure (official ``shape_guided_diffusion.py`` with ``utils.inversion``): DDIM inversion of the image with
the source prompt, unguided, with inside-outside attention on, over the sampling timesteps ascending: N − 1
steps from the lowest (the clean latent taken as that level, the UNet called there) to the highest;
denoising with the target prompt from that latent, the last step to ᾱ = 1 (the clean level, not ᾱ of the
lowest timestep); after step i the background is copied from the inversion latent of the step's input
level (the last step: the clean latent). Masks are resized to each layer's grid and to the latent with
nearest neighbours as PIL's ``NEAREST`` (pixel centres). Object mask: the dataset's
(``example.extra["object_mask"]``, e.g. PIE-Bench) or the source's cross-attention map of the edited
word(s) (our choice: the official code takes a given COCO mask).

Adaptations (named in ``configs/method/shape_guided.yaml``): one prompt per branch instead of the
official embedding composed of an "inside" prompt (positions 1–38) and an "outside" prompt (39–76): the
object tokens are the words that differ between source and target, every other position (other words,
end and padding tokens) is "outside".
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from sdattn.errors import UserError
from sdattn.hooks import AttentionHook, HookSet, StepState
from sdattn.layers import LayerId, select_layers
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import check_prompts, ddim_scheduler, decode, denoise, encode_image, encode_prompts, latent_size

from ..inversion import ddim_invert
from ..two_branch import Images, model_layers

REAL_ONLY = "shape_guided runs on real images only (as in the paper)"
MASK_SOURCES = ("auto", "dataset", "attention")
INVERSIONS = ("inside_outside", "plain")


@dataclass(frozen=True)
class TokenScales:
    """Per text position (L,): the weight of a token's column on object pixels (``inside``) and on
    background pixels (``outside``)."""

    inside: torch.Tensor
    outside: torch.Tensor


def token_scales(length: int, inside: Sequence[int], fixed: Sequence[int], cross_attn_scale: float) -> TokenScales:
    """Object tokens ``inside`` on the object only, every other position but the start token on the
    background only, all × ``cross_attn_scale`` except the ``fixed`` ones (scale 1)."""
    a_in, a_out = torch.zeros(length), torch.full((length,), float(cross_attn_scale))
    a_in[list(inside)] = cross_attn_scale
    a_out[list(inside)] = 0.0
    a_out[list(fixed)] = 1.0
    a_out[0] = 0.0  # the start token (the official pad_idx)
    return TokenScales(a_in, a_out)


def edited_tokens(tokenizer, source_prompt: str, target_prompt: str) -> tuple[list[int], list[int], list[int]]:
    """(source positions, target positions) of the tokens that differ (difflib over the token ids, start
    and end tokens excluded), and the target's word positions equal to the source's (the official
    ``compute_fixed_indices``: equal blocks before the first pad, start token dropped)."""
    a, b = tokenizer(source_prompt).input_ids, tokenizer(target_prompt).input_ids
    same_a, same_b = set(), set()
    for blk in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        same_a.update(range(blk.a, blk.a + blk.size))
        same_b.update(range(blk.b, blk.b + blk.size))
    src = [i for i in range(1, len(a) - 1) if i not in same_a]
    tgt = [j for j in range(1, len(b) - 1) if j not in same_b]
    fixed = [j for j in range(1, len(b) - 1) if j in same_b]
    return src, tgt, fixed


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) 0/1 → (1, 1, height, width) with nearest neighbours at pixel centres: the official
    ``segm.resize((w, h), resample=PIL.Image.NEAREST)`` (per layer and for the latent), exactly."""
    return F.interpolate(mask.float(), size=(height, width), mode="nearest-exact")


class InsideOutsideAttention(AttentionHook):
    """Shape-Guided's inside-outside attention on one layer (every row, every call)."""

    def __init__(self, layer: LayerId, state: StepState, object_mask: torch.Tensor, scales: TokenScales,
                 self_attn_scale: float):
        super().__init__(layer, state)
        self.obj = resize_mask(object_mask, layer.height, layer.width).flatten()  # (N,)
        self.scales, self.self_attn_scale = scales, float(self_attn_scale)
        self._weights: dict[int, torch.Tensor] = {}  # key count → (N, K), built once per layer

    def weights(self, n_keys: int) -> torch.Tensor:
        """(N, K) multipliers of the attention probabilities."""
        if n_keys not in self._weights:
            self._weights[n_keys] = self.build_weights(n_keys)
        return self._weights[n_keys]

    def build_weights(self, n_keys: int) -> torch.Tensor:
        obj = self.obj[:, None]
        if self.layer.kind == "cross":
            return obj * self.scales.inside[None, :n_keys] + (1 - obj) * self.scales.outside[None, :n_keys]
        same = obj * obj.T + (1 - obj) * (1 - obj).T
        return (same - 1) * self.self_attn_scale + 1

    def attend(self, attn, query, key, value, mask):
        if query.shape[2] != self.obj.numel():
            raise UserError(f"shape_guided: layer {self.layer.label} has {query.shape[2]} query tokens, the mask "
                            f"{self.obj.numel()}; give images of the model's default size (resize=)")
        probs = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, -1)  # (B, H, N, K)
        return (probs * self.weights(key.shape[2]).to(probs)) @ value


def attention_mask(pipe, z0: torch.Tensor, source_prompt: str, positions: Sequence[int], num_inference_steps: int,
                   divisor: int, threshold: float) -> torch.Tensor:
    """Object mask from the source's cross-attention of ``positions`` during a plain DDIM inversion of
    ``z0``: the maps of the cross layers at 1/``divisor`` of the latent side, averaged over steps and
    layers, divided by their maximum, > ``threshold`` → (1, 1, h', w') float 0/1."""
    h, _ = latent_size(pipe)
    layers = select_layers(model_layers(pipe), "all", "cross", f"1/{divisor}")
    if not layers:
        sides = sorted({x.height for x in model_layers(pipe) if x.kind == "cross"})
        raise UserError(f"method.mask_resolution_divisor {divisor}: no cross layer at side {h // divisor}; "
                        f"this model's cross layers have sides {sides} (latent side {h})")
    words = torch.zeros(1, 1, pipe.tokenizer.model_max_length)  # (1, T=1, L): the positions' sum
    words[0, 0, list(positions)] = 1.0
    rec = Recorder([Tap(layers, "probs", heads="mean", tokens=words, over_steps="mean")])
    with rec.installed(pipe.unet):
        ddim_invert(pipe, z0, source_prompt, num_inference_steps, progress=False)
    m = torch.stack(list(rec["probs"].values())).mean(0)[:1]  # (1, 1, N): mean over layers of step means
    m = m.reshape(1, 1, layers[0].height, layers[0].width)
    return (m / m.max().clamp_min(1e-12) > threshold).float()


def dataset_mask(example) -> torch.Tensor | None:
    """The example's own object mask (``extra["object_mask"]``: an (H, W) array or a callable giving
    one, 1 = object) as (1, 1, H, W) float 0/1; None when it has none."""
    m = example.extra.get("object_mask")
    if m is None:
        return None
    m = m() if callable(m) else m
    return torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None]


class CopyBackground:
    """Sampler callback (official ``copy_background``): after step i, background = the inversion latent
    of step i's input level, ``trajectory[-i-1]`` of :func:`shape_guided_inversion`'s N latents (the last
    step: the clean ``trajectory[0]``)."""

    def __init__(self, object_mask: torch.Tensor, trajectory: Sequence[torch.Tensor]):
        self.obj, self.trajectory = object_mask, trajectory  # (1, 1, h, w) at latent size; [z_0, ..., z_{t_N}]

    def on_step_begin(self, step, timestep, num_steps, layout):
        pass

    def on_step_end(self, step, timestep, latents):
        ref = self.trajectory[-step - 1].to(latents)
        obj = self.obj.to(latents)
        return ref * (1 - obj) + latents * obj


@torch.no_grad()
def shape_guided_inversion(pipe, z0: torch.Tensor, prompt: str, num_inference_steps: int) -> list[torch.Tensor]:
    """The official inversion (``utils.inversion(..., run_inversion=True)``, unguided with ``prompt``): over the
    sampling timesteps t_1 < … < t_N, N − 1 DDIM steps from ``z0`` taken as level t_1 (the UNet called at t_1)
    up to t_N → [z0, z_{t_2}, ..., z_{t_N}] (N latents; the sampler starts from the last at t_N)."""
    unet = pipe.unet
    scheduler = ddim_scheduler(pipe)
    scheduler.set_timesteps(num_inference_steps)
    ascending = scheduler.timesteps.flip(0).tolist()
    alphas = scheduler.alphas_cumprod
    context = encode_prompts(pipe, [prompt] * z0.shape[0]).to(unet.device, unet.dtype)
    z = z0.to(unet.device, torch.float32)
    trajectory = [z]
    for t, t_next in zip(ascending[:-1], ascending[1:]):
        eps = unet(z.to(unet.dtype), t, encoder_hidden_states=context).sample.float()
        a, a_next = float(alphas[t]), float(alphas[t_next])
        z = a_next ** 0.5 * (z - (1 - a) ** 0.5 * eps) / a ** 0.5 + (1 - a_next) ** 0.5 * eps
        trajectory.append(z)
    return trajectory


def to_clean_level_scheduler(pipe) -> DDIMScheduler:
    """DDIM from the model's config whose last step goes to ᾱ = 1 (official: ``at_next = 1`` after the
    lowest timestep), whatever the model's ``set_alpha_to_one``."""
    return DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)


def check_settings(mask_source, mask_threshold, mask_resolution_divisor, inversion, cross_attn_scale,
                   self_attn_scale) -> None:
    if mask_source not in MASK_SOURCES:
        raise UserError(f"method.mask_source {mask_source!r} is not one of {list(MASK_SOURCES)}")
    if inversion not in INVERSIONS:
        raise UserError(f"method.inversion {inversion!r} is not one of {list(INVERSIONS)}")
    if not 0 <= float(mask_threshold) < 1:
        raise UserError(f"method.mask_threshold {mask_threshold} is outside [0, 1)")
    if isinstance(mask_resolution_divisor, bool) or not isinstance(mask_resolution_divisor, int) \
            or mask_resolution_divisor < 1:
        raise UserError(f"method.mask_resolution_divisor {mask_resolution_divisor!r} must be a positive integer")
    if float(cross_attn_scale) < 0 or float(self_attn_scale) < 0:
        raise UserError("method.cross_attn_scale and method.self_attn_scale must be ≥ 0")


@torch.no_grad()
def shape_guided_latents(pipe, z0: torch.Tensor, object_mask: torch.Tensor, source_prompt: str, target_prompt: str,
                         *, cross_attn_scale: float, self_attn_scale: float, inversion: str, num_inference_steps: int,
                         guidance_scale: float) -> torch.Tensor:
    """Invert ``z0`` (1, C, h, w) and denoise with the target prompt under inside-outside attention with
    ``object_mask`` (1, 1, H, W; 1 = object) → final latents (1, C, h, w)."""
    tok = pipe.tokenizer
    src_pos, tgt_pos, fixed = edited_tokens(tok, source_prompt, target_prompt)
    if not tgt_pos:
        raise UserError(f"shape_guided: the target prompt {target_prompt!r} has no word the source lacks "
                        "(no object tokens)")
    length = tok.model_max_length
    layers = model_layers(pipe)
    inv_scales = token_scales(length, src_pos, (), cross_attn_scale)  # inversion: no fixed tokens (official)
    edit_scales = token_scales(length, tgt_pos, fixed, cross_attn_scale)

    def hooks(scales):
        return HookSet(pipe.unet, layers,
                       lambda lay, st: InsideOutsideAttention(lay, st, object_mask, scales, self_attn_scale))

    if inversion == "inside_outside":
        with hooks(inv_scales):
            traj = shape_guided_inversion(pipe, z0, source_prompt, num_inference_steps)
    else:
        traj = shape_guided_inversion(pipe, z0, source_prompt, num_inference_steps)
    h, w = z0.shape[-2:]
    uncond = encode_prompts(pipe, [""]) if guidance_scale > 1 else None
    with hooks(edit_scales) as hookset:
        return denoise(pipe, traj[-1], encode_prompts(pipe, [target_prompt]), uncond, num_inference_steps,
                       guidance_scale, [hookset, CopyBackground(resize_mask(object_mask, h, w), traj)], progress=False,
                       scheduler=to_clean_level_scheduler(pipe))


def edit_shape_guided(pipe, example, seed: int, image: torch.Tensor | None = None, *, cross_attn_scale: float,
                      self_attn_scale: float, mask_source: str, mask_threshold: float, mask_resolution_divisor: int,
                      inversion: str, num_inference_steps: int, guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/shape_guided.yaml``): one real pair → (source, edited); a
    generated pair is refused with a one-line UserError (the runner records it as skipped)."""
    check_settings(mask_source, mask_threshold, mask_resolution_divisor, inversion, cross_attn_scale, self_attn_scale)
    if image is None:
        raise UserError(REAL_ONLY)
    src, tgt = example.source_prompt, example.target_prompt
    check_prompts(pipe.tokenizer, [src, tgt])
    steps = int(num_inference_steps)
    z0 = encode_image(pipe, image)
    mask = dataset_mask(example) if mask_source in ("auto", "dataset") else None
    if mask is None and mask_source == "dataset":
        raise UserError(f"shape_guided: example {example.id!r} has no object mask (method.mask_source=dataset)")
    if mask is None:
        src_pos = edited_tokens(pipe.tokenizer, src, tgt)[0]
        if not src_pos:
            raise UserError(f"shape_guided: the source prompt {src!r} has no word the target lacks: no word "
                            "to take the object mask from")
        mask = attention_mask(pipe, z0, src, src_pos, steps, mask_resolution_divisor, float(mask_threshold))
    out = shape_guided_latents(pipe, z0, mask, src, tgt, cross_attn_scale=float(cross_attn_scale),
                               self_attn_scale=float(self_attn_scale), inversion=inversion,
                               num_inference_steps=steps, guidance_scale=float(guidance_scale))
    return image, decode(pipe, out)
