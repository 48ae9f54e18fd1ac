"""Opt-in fast sampling (``compile=true``): fused QKV projections, channels-last and ``torch.compile``
of the UNet, applied in place so every sampler, hook and editor uses them unchanged.

- ``unet.fuse_qkv_projections()`` (diffusers): one GEMM for q, k, v of self-attention layers and for k, v
  of cross-attention layers; unhooked layers then run diffusers' ``FusedAttnProcessor2_0`` and our hooks
  use the fused weights too (:func:`sdattn.hooks.project_qkv`). The separate ``to_q/to_k/to_v`` weights
  stay (diffusers keeps them), so the attention projections' memory is held twice.
- channels-last memory format for the UNet's convolutions.
- ``unet.compile()``: ``torch.compile`` of the UNet's forward (module kept, so ``set_attn_processor``
  and the hooks work as before). Installing hooks recompiles once per hook configuration; the step
  number never does (hooks read it as a tensor, :class:`editing.replace.RowInjection`).
"""

from __future__ import annotations

import torch


def accelerate(pipe, compile: bool = True, channels_last: bool = True, fuse_qkv: bool = True):
    """Apply the chosen speed-ups to ``pipe.unet`` in place; returns ``pipe``."""
    unet = pipe.unet
    if fuse_qkv:
        unet.fuse_qkv_projections()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile()
    return pipe
