"""Two-branch editing: source and target sampled together in one batch, with attention hooks that
let the target read from the source. The machinery FPE, the attention-replacement baselines (P2P,
MasaCtrl, PnP) and the ablations share: batch positions, the result type, re-anchoring the source
branch to an inversion trajectory, and the replacement edit itself."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sdattn.hooks import AttentionHook, HookSet, StepState
from sdattn.layers import LayerId, enumerate_layers
from sdattn.sampling import check_prompts, denoise, encode_prompts, latent_size

SOURCE, TARGET = 0, 1  # batch positions of the two branches
Images = tuple[torch.Tensor, torch.Tensor]  # (source, edited), each (1, 3, H, W) in [0, 1]


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
    """The attention layers of ``pipe``'s UNet at its default latent size."""
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
    return replacement_edits(pipe, [(source_prompt, target_prompt)], latents, hooks, num_inference_steps,
                             guidance_scale, negative_prompt, uncond, callbacks, progress)


def pair_rows(n: int) -> list[tuple[int, int]]:
    """(source, target) prompt indices of ``n`` pairs batched by :func:`replacement_edits`."""
    return [(2 * i + SOURCE, 2 * i + TARGET) for i in range(n)]


def replacement_edits(
    pipe,
    prompt_pairs: Sequence[tuple[str, str]],
    latents: torch.Tensor,
    hooks: dict[LayerId, Callable[[LayerId, StepState], AttentionHook]],
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str = "",
    uncond: torch.Tensor | Sequence[torch.Tensor] | None = None,
    callbacks: Sequence = (),
    progress: bool = True,
) -> torch.Tensor:
    """:func:`replacement_edit` of n (source, target) pairs in one batch: prompts [s_1, t_1, ..., s_n, t_n]
    (hooks address pair i as :func:`pair_rows`), pair i from ``latents[i]`` (n, C, h, w); returns the
    final latents (2n, C, h, w) in prompt order."""
    prompts = [p for pair in prompt_pairs for p in pair]
    check_prompts(pipe.tokenizer, prompts)
    cond = encode_prompts(pipe, prompts)
    if uncond is None and guidance_scale > 1:
        uncond = encode_prompts(pipe, [negative_prompt])
    layers = list(hooks)
    with HookSet(pipe.unet, layers, lambda layer, state: hooks[layer](layer, state)) as hookset:
        return denoise(pipe, latents.repeat_interleave(2, 0), cond, uncond, num_inference_steps, guidance_scale,
                       [hookset, *callbacks], progress)
