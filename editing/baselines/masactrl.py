"""MasaCtrl (Cao et al., ICCV 2023): mutual self-attention — from ``start_step`` on, the target
queries the source's keys and values in the self layers after ``start_layer``; real images are
DDIM-inverted with ``""``; the source branch is sampled freely from the inverted latent (official:
``playground_real.ipynb`` passes no ``ref_intermediate_latents``), or re-anchored to the inversion
trajectory with ``anchor_source`` (the official pipeline's option, commented out in its notebook)."""

from __future__ import annotations

import torch

from sdattn.errors import UserError
from sdattn.hooks import StepState
from sdattn.layers import LayerId, select_layers
from sdattn.sampling import decode, encode_image, initial_latents

from ..inversion import ddim_invert
from ..replace import RowInjection
from ..two_branch import SOURCE, TARGET, AnchorSource, Images, model_layers, replacement_edit

REAL_SOURCE_PROMPTS = ("empty", "dataset")


class MutualSelfAttention(RowInjection):
    """MasaCtrl: from ``start_step`` on, the target rows of both CFG branches query the source's
    keys and values: SDPA(q_tgt, k_src, v_src)."""

    tensors = ("key", "value")

    def __init__(self, layer: LayerId, state: StepState, start_step: int):
        super().__init__(layer, state)
        self.start_step = start_step

    def active(self) -> bool:
        return self.state.step is not None and self.state.step >= self.start_step

    def rows(self, layout) -> list[tuple[int, int]]:
        rows = [(layout.cond_row(SOURCE), layout.cond_row(TARGET))]
        if layout.cfg:
            rows.append((layout.uncond_row(SOURCE), layout.uncond_row(TARGET)))
        return rows


def masactrl_layers(pipe, start_layer: int) -> list[LayerId]:
    """MasaCtrl's ``layer_idx = range(start_layer, 16)`` counts transformer blocks from 0; in SD
    numbering (1-based self layers) that is self layers start_layer+1 .. N (10 → 11-16 on SD 1.x)."""
    layers = model_layers(pipe)
    n = sum(x.kind == "self" for x in layers)
    if not 0 <= start_layer < n:
        raise UserError(f"method.start_layer {start_layer} is out of range: this model has self layers 0..{n - 1} "
                        "(MasaCtrl's 0-based count)")
    return select_layers(layers, f"{start_layer + 1}-{n}", "self")


def edit_masactrl(pipe, example, seed: int, image: torch.Tensor | None = None, *, start_step: int,
                  start_layer: int, real_source_prompt: str, anchor_source: bool, num_inference_steps: int,
                  guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/masactrl.yaml``): one pair → (source, edited)."""
    steps, guidance = int(num_inference_steps), float(guidance_scale)
    if real_source_prompt not in REAL_SOURCE_PROMPTS:
        raise UserError(f"method.real_source_prompt {real_source_prompt!r} is not one of {list(REAL_SOURCE_PROMPTS)}")
    start_step = int(start_step)
    hooks = {x: (lambda lay, st: MutualSelfAttention(lay, st, start_step))
             for x in masactrl_layers(pipe, int(start_layer))}
    src, tgt = example.source_prompt, example.target_prompt
    if image is None:
        out = replacement_edit(pipe, src, tgt, initial_latents(pipe, [seed]), hooks, steps, guidance, progress=False)
        images = decode(pipe, out)
        return images[:1], images[1:]
    # Official real-image editing: invert with an empty prompt, sample both branches from z_T; the source
    # branch replays the inversion trajectory only with anchor_source (ref_intermediate_latents).
    inv_prompt = src if real_source_prompt == "dataset" else ""
    traj = ddim_invert(pipe, encode_image(pipe, image), inv_prompt, steps, progress=False)
    callbacks = [AnchorSource(traj)] if anchor_source else []
    out = replacement_edit(pipe, inv_prompt, tgt, traj[-1], hooks, steps, guidance, callbacks=callbacks,
                           progress=False)
    return image, decode(pipe, out[1:])
