"""Plug-and-Play (Tumanyan et al., CVPR 2023) on the shared hook layer and sampler.

Official behaviour (pnp-diffusers): the source is DDIM-inverted with ``""``; during target sampling
the source branch (prompt ``""``, no guidance) runs alongside the target's CFG rows and, in both
target rows, (a) the residual branch of ``up_blocks[1].resnets[1]`` is replaced by the source's for
the first ``pnp_f_t`` = 0.8 of the steps and (b) self-attention Q, K are replaced by the source's in
the decoder self layers (SD 1.5: self layers 9–16) for the first ``pnp_attn_t`` = 0.5.

Here: ``[source, target]`` sampled together with CFG; both target rows take the source's COND row.
The source cond prompt is ``inversion_prompt`` (default ``""``, official) for real images, whose
source row replays the inversion (:class:`~editing.two_branch.AnchorSource`), and the pair's source prompt
for generated pairs (the source image is generated with it from the same seed as the target).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from sdattn.errors import UserError
from sdattn.hooks import BatchLayout
from sdattn.layers import LayerId
from sdattn.sampling import check_prompts, decode, encode_image, initial_latents

from ..inversion import ddim_invert
from ..replace import RowInjection, select_layers, step_range
from ..two_branch import SOURCE, TARGET, AnchorSource, Images, model_layers, replacement_edit

ATTN_NAME = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.")


def target_rows(layout: BatchLayout) -> list[int]:
    """The target's rows: cond, and uncond with CFG."""
    return [layout.cond_row(TARGET), *([layout.uncond_row(TARGET)] if layout.cfg else [])]


class QKInject(RowInjection):
    """PnP self-attention injection: during ``steps`` both target rows attend with the source COND
    row's query and key: SDPA(q_src, k_src, v_tgt)."""

    def rows(self, layout: BatchLayout) -> list[tuple[int, int]]:
        return [(layout.cond_row(SOURCE), row) for row in target_rows(layout)]


class FeatureInject:
    """PnP residual-feature injection: a forward hook on ``module`` that, during ``steps``, copies the
    source COND row of its output into both target rows. A sampler callback (``on_step_begin`` gives
    the step and batch layout); use :meth:`installed` to register the hook (removed in ``finally``)."""

    def __init__(self, module: torch.nn.Module, steps: set[int]):
        self.module, self.steps = module, steps
        self.step: int | None = None
        self.layout: BatchLayout | None = None

    def on_step_begin(self, step: int, timestep: int, num_steps: int, layout: BatchLayout) -> None:
        self.step, self.layout = step, layout

    def on_step_end(self, step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.step not in self.steps:
            return None
        out = output.clone()  # (B, C, h, w)
        out[target_rows(self.layout)] = output[self.layout.cond_row(SOURCE)]
        return out

    @contextmanager
    def installed(self):
        handle = self.module.register_forward_hook(self)
        try:
            yield self
        finally:
            handle.remove()


def attention_up_blocks(unet) -> list[int]:
    return [i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)]


def pnp_layers(pipe, spec) -> list[LayerId]:
    """Self layers for Q/K injection. ``"decoder"``: every self layer of the up blocks except those of
    the first attention module of the first up block with attentions (official ``{1: [1, 2], 2: [0, 1, 2],
    3: [0, 1, 2]}``: SD 1.5 self layers 9–16); otherwise a :func:`editing.replace.select_layers` spec."""
    layers = model_layers(pipe)
    if spec != "decoder":
        return select_layers(layers, spec, "self")
    first = attention_up_blocks(pipe.unet)[0]
    chosen = []
    for x in layers:
        m = ATTN_NAME.match(x.name)
        if x.kind == "self" and m and (int(m[1]), int(m[2])) != (first, 0):
            chosen.append(x)
    return chosen


def pnp_feature_module(pipe, name: str) -> tuple[str, torch.nn.Module]:
    """The resnet whose residual features are injected: ``"auto"`` = ``up_blocks.<i>.resnets.1`` of the
    first up block with attentions (official ``up_blocks[1].resnets[1]``) or an up-block resnet name.
    Returns (resnet name, its ``conv2``): the hook sits on ``conv2``, the residual branch before the skip
    is added, which is where pnp-diffusers swaps the features."""
    unet = pipe.unet
    valid = [f"up_blocks.{i}.resnets.{j}" for i, b in enumerate(unet.up_blocks) for j in range(len(b.resnets))]
    if name == "auto":
        name = f"up_blocks.{attention_up_blocks(unet)[0]}.resnets.1"
    if name not in valid:
        raise UserError(f"method.feature_block {name!r} is not an up-block resnet of this model; "
                        f"allowed: auto, {', '.join(valid)}")
    return name, unet.get_submodule(name).conv2


def pnp_injection(pipe, num_inference_steps: int, *, feature_steps, attn_steps, attn_layers,
                  feature_block: str) -> tuple[dict, FeatureInject]:
    """PnP's hooks, validated: ({self layer: QKInject factory}, the feature hook, not yet installed)."""
    feat_steps = step_range(feature_steps, num_inference_steps)
    qk_steps = step_range(attn_steps, num_inference_steps)
    hooks = {x: (lambda lay, st: QKInject(lay, st, qk_steps)) for x in pnp_layers(pipe, attn_layers)}
    _, module = pnp_feature_module(pipe, feature_block)
    return hooks, FeatureInject(module, feat_steps)


def pnp_edit(pipe, source_prompt: str, target_prompt: str, latents: torch.Tensor, num_inference_steps: int,
             guidance_scale: float, injection: tuple[dict, FeatureInject], callbacks: Sequence = ()) -> torch.Tensor:
    """Sample ``[source, target]`` from ``latents`` (1, C, h, w) with ``injection`` (from
    :func:`pnp_injection`) → final latents (2, C, h, w)."""
    hooks, feature = injection
    with feature.installed():
        return replacement_edit(pipe, source_prompt, target_prompt, latents, hooks, num_inference_steps,
                                guidance_scale, callbacks=[feature, *callbacks], progress=False)


def edit_pnp(pipe, example, seed: int, image: torch.Tensor | None = None, *, feature_steps, attn_steps,
             attn_layers, feature_block: str, inversion_prompt: str, num_inference_steps: int,
             guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/pnp.yaml``): residual features and decoder self-attention Q, K
    of the target ← source → (source, edited)."""
    steps, guidance = int(num_inference_steps), float(guidance_scale)
    injection = pnp_injection(pipe, steps, feature_steps=feature_steps, attn_steps=attn_steps,
                              attn_layers=attn_layers, feature_block=feature_block)
    src, tgt = example.source_prompt, example.target_prompt
    if image is None:
        out = pnp_edit(pipe, src, tgt, initial_latents(pipe, [seed]), steps, guidance, injection)
        images = decode(pipe, out)
        return images[:1], images[1:]
    inv_prompt = str(inversion_prompt)
    check_prompts(pipe.tokenizer, [inv_prompt, tgt])
    traj = ddim_invert(pipe, encode_image(pipe, image), inv_prompt, steps, progress=False)
    out = pnp_edit(pipe, inv_prompt, tgt, traj[-1], steps, guidance, injection, callbacks=[AnchorSource(traj)])
    return image, decode(pipe, out[1:])
