"""DDIM sampling with classifier-free guidance, per-sample seeds and step callbacks.

Conventions follow diffusers' StableDiffusionPipeline: image size defaults to
``unet.config.sample_size × vae_scale_factor``; prompts and the negative prompt are encoded padded
to ``tokenizer.model_max_length``; the DDIM scheduler is built from the model's own scheduler
config; each sample's initial latent is drawn on CPU from ``torch.Generator().manual_seed(seed)``
with shape (1, C, h, w), float32, so a sample never depends on its batch neighbours.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from .errors import UserError
from .hooks import BatchLayout


class StepCallback(Protocol):
    """Told about every step of the sampling loop, in order."""

    def on_step_begin(self, step: int, timestep: int, num_steps: int, layout: BatchLayout) -> None: ...

    def on_step_end(self, step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor | None: ...


@dataclass
class SampleOutput:
    latents: torch.Tensor  # (B, C, h, w) final latents, float32
    images: torch.Tensor | None  # (B, 3, H, W) in [0, 1], or None when not decoded


def vae_scale_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def default_size(pipe) -> tuple[int, int]:
    """(height, width) in pixels: ``unet.config.sample_size × vae_scale_factor``."""
    s = pipe.unet.config.sample_size
    h, w = (s, s) if isinstance(s, int) else s
    f = vae_scale_factor(pipe)
    return h * f, w * f


def latent_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    dh, dw = default_size(pipe)
    height, width = height or dh, width or dw
    f = vae_scale_factor(pipe)
    if height % f or width % f:
        raise UserError(f"image size {height}x{width} is not a multiple of the VAE factor {f}")
    return height // f, width // f


def check_prompts(tokenizer, prompts: Sequence[str]) -> None:
    """Raise a one-line error for a prompt longer than the text encoder allows, or with words
    outside a closed vocabulary (tokenizers saved with ``closed_vocabulary``, e.g. the toy model's)."""
    limit = tokenizer.model_max_length
    vocab = tokenizer.init_kwargs.get("closed_vocabulary")
    for p in prompts:
        if vocab:
            unknown = [w for w in re.findall(r"[^\W\d_]+|\S", p.lower()) if w not in vocab]
            if unknown:
                raise UserError(f"prompt {p!r} has words outside this model's vocabulary: {unknown}; "
                                f"vocabulary: {', '.join(vocab)}")
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > limit:
            raise UserError(f"prompt {p!r} has {n} tokens; the text encoder allows {limit} "
                            "(including start and end tokens)")


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts → text-encoder hidden states (B, L, D), padded to the tokenizer's max length."""
    tok = pipe.tokenizer
    check_prompts(tok, prompts)
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    enc = pipe.text_encoder
    return enc(ids.to(enc.device))[0]


def initial_latents(pipe, seeds: Sequence[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
    """(B, C, h, w) float32 on CPU; row i from ``torch.Generator().manual_seed(seeds[i])``."""
    h, w = latent_size(pipe, height, width)
    c = pipe.unet.config.in_channels
    return torch.cat([torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(int(s)))
                      for s in seeds])


def ddim_scheduler(pipe) -> DDIMScheduler:
    """A fresh DDIM scheduler from the model's own scheduler config."""
    return DDIMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) → images (B, 3, H, W) in [0, 1], float32 on CPU."""
    vae = pipe.vae
    x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def encode_image(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] → latents (B, C, h, w) (the posterior mean, scaled), float32."""
    vae = pipe.vae
    dist = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist
    return (dist.mean * vae.config.scaling_factor).float()


def guidance_context(cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
    """The UNet's text context: rows ``[uncond × n, cond × n]`` with CFG, else ``cond``.
    cond (n, L, D), uncond (1 or n, L, D) or None → (2n or n, L, D)."""
    return torch.cat([uncond.expand(cond.shape[0], -1, -1), cond]) if uncond is not None else cond


def _unet_noise(unet, scheduler, latents: torch.Tensor, timestep, context: torch.Tensor,
                guidance_scale: float) -> torch.Tensor:
    """One UNet call on ``context``'s rows and classifier-free guidance when it has two rows per latent.
    ``context`` is in the UNet's dtype (cast once by the caller): the latents follow it. (diffusers'
    ``unet.dtype`` walks the module tree: ~2.5 ms a call on the toy model, 5 % of a step.)"""
    cfg = context.shape[0] == 2 * latents.shape[0]
    model_in = scheduler.scale_model_input(torch.cat([latents, latents]) if cfg else latents, timestep)
    noise = unet(model_in.to(context.dtype), timestep, encoder_hidden_states=context).sample.float()
    if cfg:
        noise_u, noise_c = noise.chunk(2)
        noise = noise_u + guidance_scale * (noise_c - noise_u)
    return noise


@torch.no_grad()
def guided_noise(unet, scheduler, latents: torch.Tensor, timestep, cond: torch.Tensor, uncond: torch.Tensor | None,
                 guidance_scale: float) -> torch.Tensor:
    """The noise prediction of one sampling step: one UNet call on rows ``[uncond × n, cond × n]`` and
    classifier-free guidance, or on ``cond`` alone when ``uncond`` is None. latents (n, C, h, w),
    cond (n, L, D) and uncond (1 or n, L, D) in the UNet's dtype and device → (n, C, h, w) float32."""
    return _unet_noise(unet, scheduler, latents, timestep, guidance_context(cond, uncond), guidance_scale)


def denoise(
    pipe,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | Sequence[torch.Tensor] | None,
    num_inference_steps: int,
    guidance_scale: float,
    callbacks: Sequence[StepCallback] = (),
    progress: bool = True,
    scheduler=None,
) -> torch.Tensor:
    """The DDIM loop on prepared inputs. Returns (B, C, h, w).

    ``cond``: (B, L, D). ``uncond``: (B or 1, L, D), or one such tensor per step (null-text
    inversion), or None for no guidance.

    Runs under ``torch.inference_mode`` (the result is a normal tensor again). No host syncs per step:
    the text context is built once, the timesteps go to the device once (the callbacks get Python ints
    from the CPU copy), and the scheduler steps with CPU scalars.
    """
    unet = pipe.unet
    scheduler = scheduler or ddim_scheduler(pipe)
    scheduler.set_timesteps(num_inference_steps)
    cfg = uncond is not None
    layout = BatchLayout(n=latents.shape[0], cfg=cfg)
    per_step = cfg and not torch.is_tensor(uncond)
    timesteps = scheduler.timesteps  # on CPU: int(t) costs no sync
    with torch.inference_mode():
        cond = cond.to(unet.device, unet.dtype)
        context = None if per_step else guidance_context(cond, uncond.to(cond) if cfg else None)
        on_device = timesteps.to(unet.device)
        latents = latents.to(unet.device, torch.float32) * scheduler.init_noise_sigma
        for i, t in enumerate(tqdm(timesteps, desc="DDIM", disable=not progress, leave=False)):
            step_t = int(t)
            for cb in callbacks:
                cb.on_step_begin(i, step_t, len(timesteps), layout)
            ctx = guidance_context(cond, uncond[i].to(cond)) if per_step else context
            noise = _unet_noise(unet, scheduler, latents, on_device[i], ctx, guidance_scale)
            latents = scheduler.step(noise, t, latents).prev_sample
            for cb in callbacks:
                replaced = cb.on_step_end(i, step_t, latents)
                if replaced is not None:
                    latents = replaced
    return latents.clone()  # outside inference mode: an ordinary tensor for the caller


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    latents: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    callbacks: Sequence[StepCallback] = (),
    progress: bool = True,
    decode_images: bool = True,
) -> SampleOutput:
    """Generate one image per prompt. Give ``seeds`` (one per prompt) or initial ``latents``."""
    prompts = list(prompts)
    if latents is None:
        if seeds is None or len(seeds) != len(prompts):
            raise UserError(f"need one seed per prompt: got {0 if seeds is None else len(seeds)} seeds "
                            f"for {len(prompts)} prompts")
        latents = initial_latents(pipe, seeds, height, width)
    if guidance_scale < 1:
        raise UserError(f"guidance_scale {guidance_scale} is below 1; allowed: ≥ 1 (1 disables guidance)")
    cond = encode_prompts(pipe, prompts)
    uncond = encode_prompts(pipe, [negative_prompt]) if guidance_scale > 1 else None  # expanded to every row
    final = denoise(pipe, latents, cond, uncond, num_inference_steps, guidance_scale, callbacks, progress)
    return SampleOutput(final, decode(pipe, final) if decode_images else None)
