"""DiffEdit (Couairon et al., ICLR 2023) on the shared sampler.

diffusers' ``StableDiffusionDiffEditPipeline`` is deprecated (it lives in
``diffusers/pipelines/deprecated/stable_diffusion_diffedit``), so the algorithm is rebuilt here,
following that pipeline's ``generate_mask`` / ``invert`` / ``__call__`` and their defaults:

1. mask: the source latent z0 noised (``add_noise``) to the timestep of ``mask_encode_strength``,
   ``num_maps_per_mask`` noise draws; mean over draws and channels of |ε_target − ε_source| (each
   with CFG), clamped at ``mask_thresholding_ratio`` × its mean, normalised, binarised at 0.5;
2. z0 DDIM-inverted with the source prompt for the first ``int(N·inpaint_strength)`` steps, guided
   (``inversion_guidance_scale``, diffusers' ``invert`` default 7.5, negative "");
3. denoised from there with the target prompt; after each step the unmasked region is set to an
   inverted latent: ``blend_latent: pre_step`` (the reference pipeline, ``image_latents[i]``) takes the
   one at the step's own timestep t_i, one level noisier than the step's result, so the last step
   blends with z_1, not z0; ``post_step`` takes the one at the level the step reaches.

Difference from the diffusers pipeline kept: the VAE posterior mean, not a sample, as every method here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdattn.errors import UserError
from sdattn.sampling import (
    check_prompts,
    ddim_scheduler,
    decode,
    denoise,
    encode_image,
    encode_prompts,
    sample,
)

from ..img2img import FromStep, strength_steps
from ..inversion import ddim_invert
from ..two_branch import Images


def check_mask_args(num_steps: int, mask_encode_strength, num_maps_per_mask, mask_thresholding_ratio) -> int:
    """Validate the mask settings; → number of noising steps of ``mask_encode_strength``."""
    if isinstance(num_maps_per_mask, bool) or not isinstance(num_maps_per_mask, int) or num_maps_per_mask <= 0:
        raise UserError(f"method.num_maps_per_mask {num_maps_per_mask!r} must be a positive integer")
    if not mask_thresholding_ratio > 0:
        raise UserError(f"method.mask_thresholding_ratio {mask_thresholding_ratio} must be positive")
    k = strength_steps("mask_encode_strength", mask_encode_strength, num_steps)
    if k == 0:
        raise UserError(f"method.mask_encode_strength {mask_encode_strength} gives no noising step at "
                        f"{num_steps} steps; allowed: ≥ 1/{num_steps}")
    return k


@torch.no_grad()
def diffedit_mask(pipe, z0: torch.Tensor, source_prompt: str, target_prompt: str, seed: int,
                  num_inference_steps: int, guidance_scale: float, *, mask_encode_strength: float,
                  num_maps_per_mask: int, mask_thresholding_ratio: float) -> torch.Tensor:
    """DiffEdit's mask of latent ``z0`` (1, C, h, w) → (1, 1, h, w) float of 0/1 (1 = edit).

    Noise draws from ``torch.Generator().manual_seed(seed)``. Identical prompts give an empty mask."""
    k = check_mask_args(num_inference_steps, mask_encode_strength, num_maps_per_mask, mask_thresholding_ratio)
    unet, m = pipe.unet, num_maps_per_mask
    scheduler = ddim_scheduler(pipe)
    scheduler.set_timesteps(num_inference_steps)
    t = scheduler.timesteps[num_inference_steps - k]
    z0 = z0.to(unet.device, torch.float32)
    noise = torch.randn((m, *z0.shape[1:]), generator=torch.Generator().manual_seed(int(seed))).to(z0)
    z_t = scheduler.scale_model_input(scheduler.add_noise(z0.expand(m, -1, -1, -1), noise, t[None]), t)
    cfg = guidance_scale > 1
    prompts = list(dict.fromkeys([source_prompt, target_prompt]))  # identical prompts: one prediction
    rows = ([""] if cfg else []) + prompts
    context = encode_prompts(pipe, rows).to(unet.device, unet.dtype).repeat_interleave(m, 0)  # (rows·m, L, D)
    eps = unet(z_t.repeat(len(rows), 1, 1, 1).to(unet.dtype), t, encoder_hidden_states=context).sample.float()
    eps = eps.view(len(rows), m, *eps.shape[1:])  # (rows, m, C, h, w)
    if cfg:
        eps = eps[0] + guidance_scale * (eps[1:] - eps[0])
    eps_src, eps_tgt = eps[0], eps[-1]
    guide = (eps_tgt - eps_src).abs().mean([0, 1])[None, None]  # (1, 1, h, w)
    clamp = guide.mean() * mask_thresholding_ratio
    if clamp == 0:
        return torch.zeros_like(guide)
    return (guide.clamp(0, clamp) / clamp > 0.5).float()


BLEND_LATENTS = {"pre_step": 1, "post_step": 2}  # offset from the end of the trajectory at step 0


class MaskBlend:
    """Sampler callback: after step i keep the edit inside ``mask`` and an inverted latent outside:
    mask·latents + (1 − mask)·trajectory[-i-offset]; offset 1 (``pre_step``, the reference pipeline's
    ``image_latents[i]``): the latent at step i's timestep; offset 2 (``post_step``): the one step i reaches."""

    def __init__(self, mask: torch.Tensor, trajectory: Sequence[torch.Tensor], offset: int):
        self.mask, self.trajectory = mask, trajectory  # (1, 1, h, w); [z_0, ..., z_k], each (1, C, h, w)
        self.offset = offset

    def on_step_begin(self, step, timestep, num_steps, layout):
        pass

    def on_step_end(self, step, timestep, latents):
        mask = self.mask.to(latents)
        return mask * latents + (1 - mask) * self.trajectory[-step - self.offset].to(latents)


def blend_offset(blend_latent: str) -> int:
    if blend_latent not in BLEND_LATENTS:
        raise UserError(f"method.blend_latent {blend_latent!r} is not one of {list(BLEND_LATENTS)}")
    return BLEND_LATENTS[blend_latent]


@torch.no_grad()
def diffedit_inpaint(pipe, z0: torch.Tensor, mask: torch.Tensor, source_prompt: str, target_prompt: str,
                     num_inference_steps: int, guidance_scale: float, inpaint_strength: float,
                     inversion_guidance_scale: float, blend_latent: str) -> torch.Tensor:
    """Invert ``z0`` (1, C, h, w) with the source prompt up to ``inpaint_strength``, denoise with the
    target prompt keeping the inverted latents outside ``mask`` (1, 1, h, w) → final latents (1, C, h, w)."""
    k = strength_steps("inpaint_strength", inpaint_strength, num_inference_steps)
    offset = blend_offset(blend_latent)
    if k == 0:
        return z0.clone()
    traj = ddim_invert(pipe, z0, source_prompt, num_inference_steps, progress=False, until=k,
                       guidance_scale=float(inversion_guidance_scale))
    scheduler = FromStep.from_config(pipe.scheduler.config)
    scheduler.t_start = num_inference_steps - k
    uncond = encode_prompts(pipe, [""]) if guidance_scale > 1 else None
    return denoise(pipe, traj[-1], encode_prompts(pipe, [target_prompt]), uncond, num_inference_steps,
                   guidance_scale, callbacks=[MaskBlend(mask, traj, offset)], progress=False, scheduler=scheduler)


def edit_diffedit(pipe, example, seed: int, image: torch.Tensor | None = None, *, mask_encode_strength: float,
                  num_maps_per_mask: int, mask_thresholding_ratio: float, inpaint_strength: float,
                  inversion_guidance_scale: float, blend_latent: str, num_inference_steps: int,
                  guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/diffedit.yaml``): mask from noise-prediction differences, then
    masked inpainting from the inversion → (source, edited)."""
    steps, guidance = int(num_inference_steps), float(guidance_scale)
    mask_kw = dict(mask_encode_strength=float(mask_encode_strength), num_maps_per_mask=num_maps_per_mask,
                   mask_thresholding_ratio=float(mask_thresholding_ratio))
    strength = float(inpaint_strength)
    check_mask_args(steps, **mask_kw)  # fail before any sampling
    strength_steps("inpaint_strength", strength, steps)
    blend_offset(blend_latent)
    src, tgt = example.source_prompt, example.target_prompt
    check_prompts(pipe.tokenizer, [src, tgt])
    if image is None:
        generated = sample(pipe, [src], [seed], num_inference_steps=steps, guidance_scale=guidance, progress=False)
        z0, source = generated.latents, generated.images
    else:
        z0, source = encode_image(pipe, image), image
    mask = diffedit_mask(pipe, z0, src, tgt, seed, steps, guidance, **mask_kw)
    return source, decode(pipe, diffedit_inpaint(pipe, z0, mask, src, tgt, steps, guidance, strength,
                                                      inversion_guidance_scale, blend_latent))
