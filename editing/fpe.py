"""Free-Prompt-Editing (Liu et al. §4): Alg. 1 (generated images) and Alg. 2 (real images), and
the general source→target replacement edit the ablations use. All on the shared hook layer and
sampler: the step index comes from the sampling loop, layers from ``LayerId`` selectors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sdattn.hooks import AttentionHook, HookSet, StepState
from sdattn.layers import LayerId, enumerate_layers
from sdattn.sampling import (
    check_prompts,
    decode,
    denoise,
    encode_image,
    encode_prompts,
    initial_latents,
    latent_size,
)

from .inversion import ddim_invert, null_text_inversion
from .replace import AttentionReplace, select_layers, step_range

SOURCE, TARGET = 0, 1  # batch positions of the two branches


@dataclass
class EditResult:
    latents: dict[str, torch.Tensor]  # name → (1, C, h, w) final latents
    images: dict[str, torch.Tensor]  # name → (1, 3, H, W) in [0, 1]
    info: dict = field(default_factory=dict)


class AnchorSource:
    """Sampler callback: after each step but the last, reset the source row to the inversion
    trajectory (the official FPE real-image procedure), so the source branch replays the input."""

    def __init__(self, trajectory: Sequence[torch.Tensor]):
        self.trajectory = trajectory  # [z_0, ..., z_T], each (1, C, h, w)

    def on_step_begin(self, step, timestep, num_steps, layout):
        self.num_steps = num_steps

    def on_step_end(self, step, timestep, latents):
        if step >= self.num_steps - 1:
            return None
        latents = latents.clone()
        latents[SOURCE] = self.trajectory[-step - 2][0].to(latents)
        return latents


def model_layers(pipe) -> list[LayerId]:
    return enumerate_layers(pipe.unet, latent_size(pipe))


def replacement_edit(
    pipe,
    source_prompt: str,
    target_prompt: str,
    latents: torch.Tensor,
    hooks: dict[LayerId, Callable[[LayerId, StepState], AttentionHook]],
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str = "",
    uncond: torch.Tensor | Sequence[torch.Tensor] | None = None,
    callbacks: Sequence = (),
    progress: bool = True,
) -> torch.Tensor:
    """Sample source and target together from ``latents`` (1, C, h, w) with ``hooks``
    ({layer: factory}); returns final latents (2, C, h, w): [source, target]."""
    check_prompts(pipe.tokenizer, [source_prompt, target_prompt])
    cond = encode_prompts(pipe, [source_prompt, target_prompt])
    if uncond is None and guidance_scale > 1:
        uncond = encode_prompts(pipe, [negative_prompt])
    layers = list(hooks)
    with HookSet(pipe.unet, layers, lambda layer, state: hooks[layer](layer, state)) as hookset:
        return denoise(pipe, latents.repeat(2, 1, 1, 1), cond, uncond, num_inference_steps, guidance_scale,
                       [hookset, *callbacks], progress)


def self_replace_hooks(pipe, layers="paper", steps=0.8, num_inference_steps: int = 50) -> dict:
    """FPE's hooks: self-attention map of the target ← source on ``layers`` during ``steps``."""
    chosen = select_layers(model_layers(pipe), layers, "self")
    active = step_range(steps, num_inference_steps)
    return {layer: (lambda lay, st: AttentionReplace(lay, st, [(SOURCE, TARGET)], active)) for layer in chosen}


def fpe_generated(
    pipe,
    source_prompt: str,
    target_prompt: str,
    seed: int,
    layers="paper",
    self_replace_steps=0.8,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    progress: bool = True,
) -> EditResult:
    """Alg. 1: source and target from one initial latent; the target's conditional branch uses
    the source's self-attention maps on ``layers`` for the first ``self_replace_steps``."""
    hooks = self_replace_hooks(pipe, layers, self_replace_steps, num_inference_steps)
    z_t = initial_latents(pipe, [seed])
    out = replacement_edit(pipe, source_prompt, target_prompt, z_t, hooks, num_inference_steps, guidance_scale,
                           negative_prompt, progress=progress)
    images = decode(pipe, out)
    return EditResult({"source": out[:1], "edited": out[1:]}, {"source": images[:1], "edited": images[1:]},
                      {"layers": [x.label for x in hooks]})


def fpe_real(
    pipe,
    image: torch.Tensor,
    target_prompt: str,
    source_prompt: str = "",
    inversion: str = "ddim",
    layers="paper",
    self_replace_steps=0.8,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    null_text: dict | None = None,
    progress: bool = True,
) -> EditResult:
    """Alg. 2: ``image`` (1, 3, H, W) in [0, 1] → VAE latent → inversion → edit.

    ``inversion="ddim"``: DDIM inversion with ``source_prompt`` (default: empty, as the paper)
    and the source branch re-anchored to the trajectory at each step (official code).
    ``inversion="null_text"``: DDIM inversion with the source prompt, then null-text inversion;
    the source branch follows the trajectory through the optimised unconditional embeddings.
    """
    from sdattn.errors import UserError

    if inversion not in ("ddim", "null_text"):
        raise UserError(f"edit.inversion {inversion!r} is not one of ['ddim', 'null_text']")
    check_prompts(pipe.tokenizer, [source_prompt, target_prompt])
    z0 = encode_image(pipe, image)
    traj = ddim_invert(pipe, z0, source_prompt, num_inference_steps, progress)
    hooks = self_replace_hooks(pipe, layers, self_replace_steps, num_inference_steps)
    if inversion == "ddim":
        out = replacement_edit(pipe, source_prompt, target_prompt, traj[-1], hooks, num_inference_steps,
                               guidance_scale, callbacks=[AnchorSource(traj)], progress=progress)
    else:
        uncond = null_text_inversion(pipe, traj, source_prompt, guidance_scale, progress=progress,
                                     **(null_text or {}))
        out = replacement_edit(pipe, source_prompt, target_prompt, traj[-1], hooks, num_inference_steps,
                               guidance_scale, uncond=uncond, progress=progress)
    images = decode(pipe, out)
    return EditResult(
        {"input": z0, "inverted": traj[-1], "reconstruction": out[:1], "edited": out[1:]},
        {"input": image, "reconstruction": images[:1], "edited": images[1:]},
        {"layers": [x.label for x in hooks]},
    )
