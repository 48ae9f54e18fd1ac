"""Real images into the model: DDIM inversion, null-text inversion (reading and fitting: ``editing.images``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMInverseScheduler
from tqdm.auto import tqdm

from sdattn.sampling import ddim_scheduler, default_size, encode_prompts

from .images import load_image  # noqa: F401  (re-exported: the runner and tasks load images through here)


def image_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    dh, dw = default_size(pipe)
    return height or dh, width or dw


@torch.no_grad()
def ddim_invert(pipe, latents: torch.Tensor, prompt: str = "", num_inference_steps: int = 50,
                progress: bool = True, until: int | None = None, guidance_scale: float = 1.0,
                negative_prompt: str = "") -> list[torch.Tensor]:
    """DDIM inversion with diffusers' ``DDIMInverseScheduler``: unguided by default; with
    ``guidance_scale`` > 1 each step's noise is ε_u + g·(ε_c − ε_u), ε_u from ``negative_prompt`` (one UNet
    call on ``[uncond, cond]``, as diffusers' DiffEdit ``invert``).

    latents (B, C, h, w) → trajectory [z_0, z_1, ..., z_T] (T = num_inference_steps), where
    z_T pairs with the sampler's first step and z_{T-i-1} is what the sampler's step i should reach.
    ``until``: run only the first ``until`` inversion steps → [z_0, ..., z_until] (a prefix of the full one).
    """
    unet = pipe.unet
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(num_inference_steps)
    n = latents.shape[0]
    cfg = guidance_scale > 1
    context = encode_prompts(pipe, ([negative_prompt] * n if cfg else []) + [prompt] * n).to(unet.device, unet.dtype)
    z = latents.to(unet.device, torch.float32)
    traj = [z]
    for t in tqdm(inverse.timesteps[:until], desc="DDIM inversion", disable=not progress, leave=False):
        model_in = inverse.scale_model_input(torch.cat([z, z]) if cfg else z, t)
        noise = unet(model_in.to(unet.dtype), t, encoder_hidden_states=context).sample.float()
        if cfg:
            noise_u, noise_c = noise.chunk(2)
            noise = noise_u + guidance_scale * (noise_c - noise_u)
        z = inverse.step(noise, t, z).prev_sample
        traj.append(z)
    return traj


def null_text_inversion(
    pipe,
    trajectory: Sequence[torch.Tensor],
    prompt: str,
    guidance_scale: float,
    inner_steps: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Null-text inversion (Mokady et al.): per sampling step, optimise the unconditional
    embedding so that guided DDIM with ``prompt`` follows the inversion ``trajectory``.

    Returns one unconditional embedding (1, L, D) per sampling step, in the UNet's dtype. The latents,
    the scheduler maths, the loss and the optimised embedding stay float32 whatever the UNet's dtype
    (Adam on a float16 tensor underflows); the UNet sees its own dtype.
    """
    unet = pipe.unet
    steps = len(trajectory) - 1
    scheduler = ddim_scheduler(pipe)
    scheduler.set_timesteps(steps)

    def eps(z: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:  # (1, C, h, w) float32
        return unet(z.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype)).sample.float()

    with torch.no_grad():
        cond = encode_prompts(pipe, [prompt]).to(unet.device, unet.dtype)
        uncond = encode_prompts(pipe, [""]).to(unet.device, torch.float32)
    z = trajectory[-1].to(unet.device, torch.float32).clone()
    out = []
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="null-text inversion", disable=not progress, leave=False)):
        target = trajectory[-i - 2].to(unet.device, torch.float32)
        with torch.no_grad():
            noise_c = eps(z, t, cond)
        uncond = uncond.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=lr)
        for _ in range(inner_steps):
            noise_u = eps(z, t, uncond)
            noise = noise_u + guidance_scale * (noise_c - noise_u)
            prev = scheduler.step(noise, t, z).prev_sample
            loss = torch.nn.functional.mse_loss(prev, target)
            # gradient for the embedding only: the shared UNet's weights get no .grad (nor its cost)
            (uncond.grad,) = torch.autograd.grad(loss, [uncond])
            opt.step()
            if loss.item() < early_stop:
                break
        uncond = uncond.detach()
        out.append(uncond.to(unet.dtype))
        with torch.no_grad():
            noise_u = eps(z, t, uncond)
            z = scheduler.step(noise_u + guidance_scale * (noise_c - noise_u), t, z).prev_sample
    return out
