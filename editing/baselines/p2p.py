"""Prompt-to-Prompt (Hertz et al., ICLR 2023) on the shared hook layer: the target's cross-attention
maps ← the source's ("replace" for equal token counts, "refine" otherwise) plus self-attention maps;
real images through DDIM + null-text inversion. Every map replacement is the SDPA identity
softmax(Q_a K_bᵀ/√d)·V_c = SDPA(q_a, k_b, v_c)."""

from __future__ import annotations

import difflib

import torch

from sdattn.errors import UserError
from sdattn.hooks import AttentionHook, StepState
from sdattn.layers import LayerId
from sdattn.sampling import check_prompts, decode, encode_image, initial_latents

from ..inversion import ddim_invert, null_text_inversion
from ..replace import AttentionReplace, select_layers, step_range
from ..two_branch import SOURCE, TARGET, Images, model_layers, replacement_edit


def padded_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True).input_ids


def refinement_mapping(tokenizer, source_prompt: str, target_prompt: str) -> tuple[list[int], list[int]]:
    """Token positions (source, target) with a counterpart in the other prompt: difflib matching blocks
    over the padded token-id sequences (start, words, end and padding all align). Target positions
    not listed keep their own map (P2P "refine")."""
    a, b = padded_ids(tokenizer, source_prompt), padded_ids(tokenizer, target_prompt)
    src, tgt = [], []
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        src += range(block.a, block.a + block.size)
        tgt += range(block.b, block.b + block.size)
    return src, tgt


class CrossRefine(AttentionHook):
    """P2P refine on a cross layer (conditional branch): the target's map columns that have a source
    counterpart are the source's columns, the others stay the target's; then · V_target."""

    def __init__(self, layer: LayerId, state: StepState, steps: set[int], src_pos, tgt_pos):
        super().__init__(layer, state)
        self.steps = steps
        self.src_pos, self.tgt_pos = torch.tensor(src_pos), torch.tensor(tgt_pos)

    def attend(self, attn, query, key, value, mask):
        out = super().attend(attn, query, key, value, mask)
        if self.state.step not in self.steps:
            return out
        lay = self.state.layout
        rs, rt = lay.cond_row(SOURCE), lay.cond_row(TARGET)
        probs = torch.softmax(query[[rs, rt]] @ key[[rs, rt]].transpose(-1, -2) * attn.scale, -1)
        new = probs[1].clone()
        new[..., self.tgt_pos] = probs[0][..., self.src_pos]
        out = out.clone()
        out[rt] = new @ value[rt]
        return out


def p2p_hooks(pipe, source_prompt: str, target_prompt: str, num_inference_steps: int, *, cross_replace_steps,
              self_replace_steps, cross_layers, self_layers, refine: bool) -> tuple[dict, str]:
    """{layer: factory} for P2P: cross maps (replace or refine) + self maps; and the mode used."""
    layers = model_layers(pipe)
    cross = step_range(cross_replace_steps, num_inference_steps)
    self_steps = step_range(self_replace_steps, num_inference_steps)
    pair = [(SOURCE, TARGET)]
    tok = pipe.tokenizer
    same_len = len(tok(source_prompt).input_ids) == len(tok(target_prompt).input_ids)
    mode = "replace" if same_len else "refine"
    if mode == "refine" and not refine:
        raise UserError(f"p2p refine is off (method.refine=false) and {source_prompt!r} → {target_prompt!r} "
                        "differ in token count")
    hooks: dict = {}
    for layer in select_layers(layers, cross_layers, "cross"):
        if mode == "replace":
            hooks[layer] = lambda lay, st: AttentionReplace(lay, st, pair, cross)
        else:
            s, t = refinement_mapping(tok, source_prompt, target_prompt)
            hooks[layer] = lambda lay, st, s=s, t=t: CrossRefine(lay, st, cross, s, t)
    for layer in select_layers(layers, self_layers, "self"):
        hooks[layer] = lambda lay, st: AttentionReplace(lay, st, pair, self_steps)
    return hooks, mode


def edit_p2p(pipe, example, seed: int, image: torch.Tensor | None = None, *, cross_replace_steps,
             self_replace_steps, cross_layers, self_layers, refine: bool, null_text: dict | None,
             num_inference_steps: int, guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/p2p.yaml``): one pair → (source, edited)."""
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
