"""SDEdit (Meng et al., ICLR 2022): the source latent noised to the strength's timestep (DDIM
timesteps, diffusers img2img convention), then denoised with the target prompt.

The SDEdit noise is a fresh draw, as in every official img2img (diffusers ``prepare_latents``, CompVis
``stochastic_encode``): the second draw of ``torch.Generator().manual_seed(seed)``, whose first draw
is the initial latent z_T a generated pair's source is sampled from, so the noise is independent of
that z_T (reusing z_T would pull the edit back toward the source) and still fixed by the seed."""

from __future__ import annotations

import torch

from sdattn.sampling import check_prompts, decode, denoise, encode_image, encode_prompts, sample

from ..img2img import FromStep, sdedit_start
from ..two_branch import Images


def sdedit_noise(z0: torch.Tensor, seed: int) -> torch.Tensor:
    """The noise added to z0 (1, C, h, w): the draw after z_T from the seed's generator (same shape and
    generator as ``sdattn.sampling.initial_latents``), independent of z_T."""
    generator = torch.Generator().manual_seed(int(seed))
    torch.randn(z0.shape, generator=generator)  # z_T of the seed: a generated source starts from it
    return torch.randn(z0.shape, generator=generator).to(z0)


def edit_sdedit(pipe, example, seed: int, image: torch.Tensor | None = None, *, strength: float,
                num_inference_steps: int, guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/sdedit_*.yaml``): the source latent noised to the strength's
    timestep (``add_noise`` with :func:`sdedit_noise`), then denoised with the target prompt over the
    remaining DDIM steps → (source, edited)."""
    steps, guidance, strength = int(num_inference_steps), float(guidance_scale), float(strength)
    src, tgt = example.source_prompt, example.target_prompt
    check_prompts(pipe.tokenizer, [src, tgt])
    uncond = encode_prompts(pipe, [""]) if guidance > 1 else None
    if image is None:
        generated = sample(pipe, [src], [seed], num_inference_steps=steps, guidance_scale=guidance, progress=False)
        z0, source = generated.latents, generated.images
    else:
        z0, source = encode_image(pipe, image), image
    scheduler = FromStep.from_config(pipe.scheduler.config)
    scheduler.t_start = sdedit_start(steps, strength)
    if scheduler.t_start >= steps:
        return source, source.clone()
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[:1]  # the strength's timestep: the first one left
    noise = sdedit_noise(z0, seed)
    z_t = scheduler.add_noise(z0, noise, t.to(z0.device))
    out = denoise(pipe, z_t, encode_prompts(pipe, [tgt]), uncond, steps, guidance, progress=False, scheduler=scheduler)
    return source, decode(pipe, out)
