"""Attention hooks: diffusers attention processors installed on selected layers, restored after.

A hook is an :class:`AttentionHook` (a diffusers processor computing exactly what
``AttnProcessor2_0`` computes, or ``FusedAttnProcessor2_0`` after ``unet.fuse_qkv_projections()``)
whose :meth:`AttentionHook.attend` step a subclass overrides. The sampler tells hooks the current
step and the batch layout through a shared :class:`StepState`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .layers import LayerId


@dataclass
class BatchLayout:
    """Rows of the UNet batch: ``[uncond × n, cond × n]`` with CFG, else ``[cond × n]``."""

    n: int  # prompts in the batch
    cfg: bool = True

    def cond_row(self, i: int) -> int:
        """Row of prompt ``i``'s conditional branch."""
        return self.n + i if self.cfg else i

    def uncond_row(self, i: int) -> int:
        if not self.cfg:
            raise ValueError("no unconditional branch without classifier-free guidance")
        return i

    @property
    def cond_rows(self) -> slice:
        return slice(self.n, 2 * self.n) if self.cfg else slice(0, self.n)


@dataclass
class StepState:
    """What the sampling loop tells the hooks before each UNet call (set explicitly, never counted)."""

    step: int | None = None  # 0-based index in the sampling loop
    timestep: int | None = None  # the scheduler's timestep value
    num_steps: int | None = None
    layout: BatchLayout | None = None
    # the step again, as a (1,) int64 tensor on the UNet's device, updated in place: compiled hooks
    # gather per-step tables with it (index_select, never int()), so the step's value is no recompile guard
    step_index: torch.Tensor | None = None


@dataclass
class _Projected:
    """What is needed to finish an attention call after ``attend``."""

    residual: torch.Tensor
    input_ndim: int
    shape: tuple[int, ...]


class AttentionHook:
    """A diffusers attention processor on one layer; by default identical to ``AttnProcessor2_0``.

    Subclasses override :meth:`attend` (and read ``self.state`` for step and batch layout).
    """

    def __init__(self, layer: LayerId, state: StepState):
        self.layer = layer
        self.state = state

    def prepare(self) -> None:
        """Called by :class:`HookSet` before each UNet call, outside any compiled region: build
        per-run tensors here (e.g. per-step index tables). Default: nothing."""

    def attend(self, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> torch.Tensor:
        """(B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d) → (B, H, Nq, d)."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        query, key, value, mask, ctx = project_qkv(attn, hidden_states, encoder_hidden_states, attention_mask,
                                                   temb)
        out = self.attend(attn, query, key, value, mask)
        return finish_attention(attn, out, ctx)


def project_qkv(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
    """The projection half of ``AttnProcessor2_0``: returns per-head q, k, v (B, H, N, d)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    shape = tuple(hidden_states.shape)
    if input_ndim == 4:
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    fused = getattr(attn, "fused_projections", False)  # after unet.fuse_qkv_projections(): one GEMM
    if encoder_hidden_states is None and fused:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if fused:
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, attention_mask, _Projected(residual, input_ndim, shape)


def finish_attention(attn, out: torch.Tensor, ctx: _Projected) -> torch.Tensor:
    """The output half of ``AttnProcessor2_0``: merge heads, project, residual, rescale."""
    batch, heads, n, head_dim = out.shape
    hidden_states = out.transpose(1, 2).reshape(batch, n, heads * head_dim)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if ctx.input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(ctx.shape)
    if attn.residual_connection:
        hidden_states = hidden_states + ctx.residual
    return hidden_states / attn.rescale_output_factor


@contextmanager
def installed(unet, hooks: Mapping[str, object]) -> Iterator[None]:
    """Install ``{processor name: processor}`` on ``unet``; restore every original in ``finally``."""
    original = dict(unet.attn_processors)
    unknown = sorted(set(hooks) - set(original))
    if unknown:
        raise UserError(f"no attention layer named {unknown[0]!r} in this UNet")
    try:
        unet.set_attn_processor({**original, **hooks})
        yield
    finally:
        unet.set_attn_processor(dict(original))


class HookSet:
    """Hooks for a set of layers, plus the step state the sampler updates.

    Use as a context manager (installs/restores) and pass it to the sampler as a callback.
    ``factory(layer, state)`` builds the processor of one layer.
    """

    def __init__(self, unet, layers: Sequence[LayerId], factory: Callable[[LayerId, StepState], AttentionHook]):
        self.unet = unet
        device = next(unet.parameters()).device  # (diffusers' ``unet.device`` walks every module)
        self.state = StepState(step_index=torch.zeros(1, dtype=torch.long, device=device))
        self.hooks: dict[str, AttentionHook] = {layer.name: factory(layer, self.state) for layer in layers}
        self._ctx = None

    def __enter__(self) -> HookSet:
        self._ctx = installed(self.unet, self.hooks)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        ctx, self._ctx = self._ctx, None
        return ctx.__exit__(*exc)

    # Sampler callback protocol -------------------------------------------------------------
    def on_step_begin(self, step: int, timestep: int, num_steps: int, layout: BatchLayout) -> None:
        self.state.step, self.state.timestep = step, timestep
        self.state.num_steps, self.state.layout = num_steps, layout
        self.state.step_index.fill_(step)  # in place, asynchronous: no host sync, no new tensor
        for hook in self.hooks.values():
            hook.prepare()

    def on_step_end(self, step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor | None:
        return None
