"""Real images into the model: DDIM inversion, null-text inversion (reading and fitting: ``editing.images``),
and :func:`shared_inversions`, under which editors that invert the same latents the same way share one
DDIM inversion (the edit command's comparison of several methods on one image)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import yaml
from diffusers import DDIMInverseScheduler
from tqdm.auto import tqdm

from sdattn.errors import UserError
from sdattn.files import REPO_ROOT
from sdattn.sampling import ddim_scheduler, default_size, encode_prompts


def image_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    dh, dw = default_size(pipe)
    return height or dh, width or dw


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' float32 bytes (CPU)."""
    h = hashlib.sha256()
    for x in tensors:
        h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class InversionCache:
    """The DDIM inversions of one :func:`shared_inversions` block: key → (trajectory, seconds it took);
    ``reused_s`` = the seconds of the inversions handed out again (what their users did not pay)."""

    trajectories: dict[tuple, tuple[list[torch.Tensor], float]] = field(default_factory=dict)
    reused_s: float = 0.0


SHARED: ContextVar[InversionCache | None] = ContextVar("shared_inversions", default=None)  # set inside the block


@contextmanager
def shared_inversions() -> Iterator[InversionCache]:
    """Within the block, :func:`ddim_invert` computes each distinct inversion (same UNet, latents, prompt,
    steps, guidance) once and hands the same trajectory to every later caller."""
    token = SHARED.set(InversionCache())
    try:
        yield SHARED.get()
    finally:
        SHARED.reset(token)


def reused_inversion_seconds() -> float:
    """Inside :func:`shared_inversions`: the seconds of the inversions handed out again so far; else 0."""
    cache = SHARED.get()
    return 0.0 if cache is None else cache.reused_s


def ddim_invert(pipe, latents: torch.Tensor, prompt: str = "", num_inference_steps: int = 50,
                progress: bool = True, until: int | None = None, guidance_scale: float = 1.0,
                negative_prompt: str = "") -> list[torch.Tensor]:
    """DDIM inversion with diffusers' ``DDIMInverseScheduler``: unguided by default; with
    ``guidance_scale`` > 1 each step's noise is ε_u + g·(ε_c − ε_u), ε_u from ``negative_prompt`` (one UNet
    call on ``[uncond, cond]``, as diffusers' DiffEdit ``invert``).

    latents (B, C, h, w) → trajectory [z_0, z_1, ..., z_T] (T = num_inference_steps), where
    z_T pairs with the sampler's first step and z_{T-i-1} is what the sampler's step i should reach.
    ``until``: run only the first ``until`` inversion steps → [z_0, ..., z_until] (a prefix of the full one).
    Inside :func:`shared_inversions` an inversion already computed there is reused.
    """
    args = (pipe, latents, prompt, num_inference_steps, progress, until, guidance_scale, negative_prompt)
    cache = SHARED.get()
    if cache is None:
        return _ddim_invert(*args)
    key = (id(pipe.unet), str(pipe.unet.dtype), tuple(latents.shape), tensor_digest(latents), prompt,
           int(num_inference_steps), until, float(guidance_scale), negative_prompt if guidance_scale > 1 else "")
    if key in cache.trajectories:
        trajectory, seconds = cache.trajectories[key]
        cache.reused_s += seconds
        return list(trajectory)
    t0 = time.perf_counter()
    trajectory = _ddim_invert(*args)
    cache.trajectories[key] = (trajectory, time.perf_counter() - t0)
    return list(trajectory)


@torch.no_grad()
def _ddim_invert(pipe, latents, prompt, num_inference_steps, progress, until, guidance_scale, negative_prompt):
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
        noise = unet(model_in.to(context.dtype), t, encoder_hidden_states=context).sample.float()
        if cfg:
            noise_u, noise_c = noise.chunk(2)
            noise = noise_u + guidance_scale * (noise_c - noise_u)
        z = inverse.step(noise, t, z).prev_sample
        traj.append(z)
    return traj


NULL_TEXT_SCHEDULE = REPO_ROOT / "configs" / "null_text" / "official.yaml"  # the one definition of the schedule


def null_text_schedule(overrides: Mapping | None = None) -> dict:
    """The official null-text schedule (``configs/null_text/official.yaml``) updated with ``overrides``."""
    schedule = yaml.safe_load(NULL_TEXT_SCHEDULE.read_text(encoding="utf-8"))
    unknown = sorted(set(overrides or {}) - set(schedule))
    if unknown:
        raise UserError(f"null_text.{unknown[0]} is not a null-text setting; settings: {', '.join(schedule)}")
    return {**schedule, **(overrides or {})}


def null_text_inversion(
    pipe,
    trajectory: Sequence[torch.Tensor],
    prompt: str,
    guidance_scale: float,
    progress: bool = True,
    **schedule,
) -> list[torch.Tensor]:
    """Null-text inversion (Mokady et al.) as the official ``NullInversion``: per sampling step i,
    optimise the unconditional embedding (starting from step i-1's) so that guided DDIM with
    ``prompt`` (the source caption) follows the inversion ``trajectory``: a fresh Adam with
    lr·(1 − lr_decay·i), at most ``inner_steps`` updates, stopping once the loss (computed before
    the update) is < early_stop + early_stop_growth·i. ``schedule``: keys of
    ``configs/null_text/official.yaml`` to override.

    Returns one unconditional embedding (1, L, D) per sampling step, in the UNet's dtype. The latents,
    the scheduler maths, the loss and the optimised embedding stay float32 whatever the UNet's dtype
    (Adam on a float16 tensor underflows); the UNet sees its own dtype.
    """
    s = null_text_schedule(schedule)
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
        opt = torch.optim.Adam([uncond], lr=s["lr"] * (1.0 - s["lr_decay"] * i))
        for _ in range(int(s["inner_steps"])):
            noise_u = eps(z, t, uncond)
            noise = noise_u + guidance_scale * (noise_c - noise_u)
            prev = scheduler.step(noise, t, z).prev_sample
            loss = torch.nn.functional.mse_loss(prev, target)
            # gradient for the embedding only: the shared UNet's weights get no .grad (nor its cost)
            (uncond.grad,) = torch.autograd.grad(loss, [uncond])
            opt.step()
            if loss.item() < s["early_stop"] + s["early_stop_growth"] * i:
                break
        uncond = uncond.detach()
        out.append(uncond.to(unet.dtype))
        with torch.no_grad():
            noise_u = eps(z, t, uncond)
            z = scheduler.step(noise_u + guidance_scale * (noise_c - noise_u), t, z).prev_sample
    return out
