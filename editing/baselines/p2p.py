"""Prompt-to-Prompt (Hertz et al., ICLR 2023) on the shared hook layer, as google/prompt-to-prompt
runs it: the target's cross-attention maps ← the source's through ``seq_aligner``'s mappers ("replace":
the word-level mapper, prompts with the same number of words; "refine": Needleman–Wunsch token
alignment, new tokens keep their own map) plus self-attention maps; real images through DDIM +
null-text inversion with the source prompt. The official code lets the user choose replace or
refine; here the rule is: replace when the prompts have the same number of words (the only case
the official replacement mapper accepts), else refine."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdattn.errors import UserError
from sdattn.hooks import AttentionHook, StepState
from sdattn.layers import LayerId
from sdattn.sampling import check_prompts, decode, encode_image, initial_latents

from ..inversion import ddim_invert, null_text_inversion
from ..replace import AttentionReplace, select_layers, step_range
from ..seq_aligner import refinement_mapper, replacement_mapper
from ..two_branch import SOURCE, TARGET, Images, model_layers, replacement_edit

MapEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (A_src, A_tgt) (H, N, L) → new A_tgt


def p2p_mode(source_prompt: str, target_prompt: str) -> str:
    """``replace`` when the prompts have the same number of words (split on " ", as seq_aligner), else ``refine``."""
    return "replace" if len(source_prompt.split(" ")) == len(target_prompt.split(" ")) else "refine"


def cross_map_edit(tokenizer, source_prompt: str, target_prompt: str, mode: str) -> MapEdit:
    """The official ``replace_cross_attention`` of AttentionReplace / AttentionRefine as a function."""
    n = tokenizer.model_max_length
    if mode == "replace":
        mapper = replacement_mapper(source_prompt, target_prompt, tokenizer, n)  # (L, L)
        return lambda a_src, a_tgt: a_src @ mapper.to(a_src)
    index, alphas = refinement_mapper(source_prompt, target_prompt, tokenizer, n)  # (L,), (L,)
    return lambda a_src, a_tgt: a_src[..., index.to(a_src.device)] * alphas.to(a_src) + a_tgt * (1 - alphas.to(a_src))


class CrossMapEdit(AttentionHook):
    """P2P on a cross layer, conditional branch, active steps: the target's attention map becomes
    ``edit(A_src, A_tgt)`` (maps (H, N, L)), then · V_target; every other row is plain attention."""

    def __init__(self, layer: LayerId, state: StepState, steps: set[int], edit: MapEdit):
        super().__init__(layer, state)
        self.steps, self.edit = steps, edit

    def attend(self, attn, query, key, value, mask):
        out = super().attend(attn, query, key, value, mask)
        if self.state.step not in self.steps:
            return out
        lay = self.state.layout
        rs, rt = lay.cond_row(SOURCE), lay.cond_row(TARGET)
        probs = torch.softmax(query[[rs, rt]] @ key[[rs, rt]].transpose(-1, -2) * attn.scale, -1)  # (2, H, N, L)
        out = out.clone()
        out[rt] = self.edit(probs[0], probs[1]) @ value[rt]
        return out


def p2p_hooks(pipe, source_prompt: str, target_prompt: str, num_inference_steps: int, *, cross_replace_steps,
              self_replace_steps, cross_layers, self_layers, refine: bool) -> tuple[dict, str]:
    """{layer: factory} for P2P: cross maps (replace or refine, :func:`p2p_mode`) + self maps; and the mode."""
    layers = model_layers(pipe)
    cross = step_range(cross_replace_steps, num_inference_steps)
    self_steps = step_range(self_replace_steps, num_inference_steps)
    mode = p2p_mode(source_prompt, target_prompt)
    if mode == "refine" and not refine:
        raise UserError(f"p2p refine is off (method.refine=false) and {source_prompt!r} → {target_prompt!r} "
                        "differ in word count")
    edit = cross_map_edit(pipe.tokenizer, source_prompt, target_prompt, mode)
    hooks: dict = {}
    for layer in select_layers(layers, cross_layers, "cross"):
        hooks[layer] = lambda lay, st: CrossMapEdit(lay, st, cross, edit)
    for layer in select_layers(layers, self_layers, "self"):
        hooks[layer] = lambda lay, st: AttentionReplace(lay, st, [(SOURCE, TARGET)], self_steps)
    return hooks, mode


def edit_p2p(pipe, example, seed: int, image: torch.Tensor | None = None, *, cross_replace_steps,
             self_replace_steps, cross_layers, self_layers, refine: bool, local_blend: dict | None,
             null_text: dict | None, num_inference_steps: int, guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/p2p.yaml``): one pair → (source, edited). Real images: DDIM
    inversion and null-text inversion (``null_text``: overrides of the official schedule) with the
    pair's source prompt (official ``null_text_w_ptp.ipynb``)."""
    if local_blend is not None:
        raise UserError("method.local_blend: LocalBlend is not implemented yet; use local_blend=null")
    steps, guidance = int(num_inference_steps), float(guidance_scale)
    src, tgt = example.source_prompt, example.target_prompt
    check_prompts(pipe.tokenizer, [src, tgt])
    hooks, _ = p2p_hooks(pipe, src, tgt, steps, cross_replace_steps=cross_replace_steps,
                         self_replace_steps=self_replace_steps, cross_layers=cross_layers, self_layers=self_layers,
                         refine=refine)
    if image is None:
        out = replacement_edit(pipe, src, tgt, initial_latents(pipe, [seed]), hooks, steps, guidance, progress=False)
        images = decode(pipe, out)
        return images[:1], images[1:]
    traj = ddim_invert(pipe, encode_image(pipe, image), src, steps, progress=False)
    uncond = null_text_inversion(pipe, traj, src, guidance, progress=False, **(null_text or {}))
    out = replacement_edit(pipe, src, tgt, traj[-1], hooks, steps, guidance, uncond=uncond, progress=False)
    return image, decode(pipe, out[1:])
