"""Tuning-free editors on the shared hook layer and sampler, behind one signature.

``METHODS[name](pipe, example, seed, cfg_method, image=None) -> (source_image, edited_image)``,
both (1, 3, H, W) in [0, 1]. Generated pairs (``image is None``): source and target start from the
same seeded initial latent. Real pairs: ``image`` (1, 3, H, W) in [0, 1] at the model size; the
returned source image is the input image itself.

Here: ``fpe`` (Liu et al., Alg. 1/2), ``p2p`` (Prompt-to-Prompt replace/refine; null-text inversion for
real images), ``masactrl`` (mutual self-attention), ``sdedit`` (noise-and-denoise at a strength). In
their own modules: ``pnp`` (evaluation/pnp.py), ``diffedit`` (evaluation/diffedit.py), ``pix2pix_zero``
(evaluation/pix2pix_zero.py) — diffusers' DiffEdit and pix2pix-zero pipelines are deprecated, so both run
on our layer — and ``instructpix2pix`` (evaluation/instructpix2pix.py: diffusers' maintained pipeline with
its own model). Every map replacement is the SDPA identity softmax(Q_a K_bᵀ/√d)·V_c = SDPA(q_a, k_b, v_c).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch

from editing.fpe import SOURCE, TARGET, AnchorSource, fpe_generated, fpe_real, model_layers, replacement_edit
from editing.inversion import ddim_invert, null_text_inversion
from editing.replace import AttentionReplace, RowInjection, select_layers, step_range
from evaluation.diffedit import edit_diffedit
from evaluation.instructpix2pix import InstructPix2Pix
from evaluation.method_utils import FromStep, cfg_get, sdedit_start, steps_guidance
from evaluation.pix2pix_zero import edit_pix2pix_zero
from evaluation.pnp import edit_pnp
from sdattn.errors import UserError
from sdattn.hooks import AttentionHook, StepState
from sdattn.layers import LayerId, LayerSelector
from sdattn.sampling import check_prompts, decode, denoise, encode_image, encode_prompts, initial_latents, sample

Images = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------- FPE

def edit_fpe(pipe, example, seed, cfg, image=None) -> Images:
    """Free-Prompt-Editing: self-attention maps of the target ← source on ``layers`` for ``self_replace_steps``."""
    steps, guidance = steps_guidance(cfg)
    common = dict(layers=cfg_get(cfg, "layers", "paper"), self_replace_steps=cfg_get(cfg, "self_replace_steps", 0.8),
                  num_inference_steps=steps, guidance_scale=guidance, progress=False)
    if image is None:
        r = fpe_generated(pipe, example.source_prompt, example.target_prompt, seed, **common)
        return r.images["source"], r.images["edited"]
    # Alg. 2 inverts with an empty prompt and uses it for the source branch (paper); "dataset" uses the pair's.
    src = example.source_prompt if cfg_get(cfg, "real_source_prompt", "empty") == "dataset" else ""
    r = fpe_real(pipe, image, example.target_prompt, src, cfg_get(cfg, "inversion", "ddim"),
                 null_text=cfg_get(cfg, "null_text"), **common)
    return image, r.images["edited"]


# ------------------------------------------------------------------------------------ Prompt-to-Prompt

def _padded_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True).input_ids


def refinement_mapping(tokenizer, source_prompt: str, target_prompt: str) -> tuple[list[int], list[int]]:
    """Token positions (source, target) with a counterpart in the other prompt: difflib matching blocks
    over the padded token-id sequences (start, words, end and padding all align). Target positions
    not listed keep their own map (P2P "refine")."""
    a, b = _padded_ids(tokenizer, source_prompt), _padded_ids(tokenizer, target_prompt)
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


def p2p_hooks(pipe, source_prompt: str, target_prompt: str, cfg) -> tuple[dict, str]:
    """{layer: factory} for P2P: cross maps (replace or refine) + self maps; and the mode used."""
    steps, _ = steps_guidance(cfg)
    layers = model_layers(pipe)
    cross = step_range(cfg_get(cfg, "cross_replace_steps", 0.8), steps)
    self_steps = step_range(cfg_get(cfg, "self_replace_steps", 0.4), steps)
    pair = [(SOURCE, TARGET)]
    tok = pipe.tokenizer
    same_len = len(tok(source_prompt).input_ids) == len(tok(target_prompt).input_ids)
    mode = "replace" if same_len else "refine"
    if mode == "refine" and not cfg_get(cfg, "refine", True):
        raise UserError(f"p2p refine is off (method.refine=false) and {source_prompt!r} → {target_prompt!r} "
                        "differ in token count")
    hooks: dict = {}
    for layer in select_layers(layers, cfg_get(cfg, "cross_layers", "all"), "cross"):
        if mode == "replace":
            hooks[layer] = lambda lay, st: AttentionReplace(lay, st, pair, cross)
        else:
            s, t = refinement_mapping(tok, source_prompt, target_prompt)
            hooks[layer] = lambda lay, st, s=s, t=t: CrossRefine(lay, st, cross, s, t)
    for layer in select_layers(layers, cfg_get(cfg, "self_layers", "official"), "self"):
        hooks[layer] = lambda lay, st: AttentionReplace(lay, st, pair, self_steps)
    return hooks, mode


def edit_p2p(pipe, example, seed, cfg, image=None) -> Images:
    steps, guidance = steps_guidance(cfg)
    src, tgt = example.source_prompt, example.target_prompt
    check_prompts(pipe.tokenizer, [src, tgt])
    hooks, _ = p2p_hooks(pipe, src, tgt, cfg)
    if image is None:
        out = replacement_edit(pipe, src, tgt, initial_latents(pipe, [seed]), hooks, steps, guidance, progress=False)
        images = decode(pipe, out)
        return images[:1], images[1:]
    traj = ddim_invert(pipe, encode_image(pipe, image), src, steps, progress=False)
    uncond = null_text_inversion(pipe, traj, src, guidance, progress=False, **(cfg_get(cfg, "null_text") or {}))
    out = replacement_edit(pipe, src, tgt, traj[-1], hooks, steps, guidance, uncond=uncond, progress=False)
    return image, decode(pipe, out[1:])


# ---------------------------------------------------------------------------------------- MasaCtrl

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
    return LayerSelector(kinds="self", indices=f"{start_layer + 1}-{n}").select(layers)


def edit_masactrl(pipe, example, seed, cfg, image=None) -> Images:
    steps, guidance = steps_guidance(cfg)
    start_step = int(cfg_get(cfg, "start_step", 4))
    hooks = {x: (lambda lay, st: MutualSelfAttention(lay, st, start_step))
             for x in masactrl_layers(pipe, int(cfg_get(cfg, "start_layer", 10)))}
    src, tgt = example.source_prompt, example.target_prompt
    if image is None:
        out = replacement_edit(pipe, src, tgt, initial_latents(pipe, [seed]), hooks, steps, guidance, progress=False)
        images = decode(pipe, out)
        return images[:1], images[1:]
    # Official real-image editing: invert with an empty prompt, source branch follows the inversion trajectory.
    inv_prompt = src if cfg_get(cfg, "real_source_prompt", "empty") == "dataset" else ""
    traj = ddim_invert(pipe, encode_image(pipe, image), inv_prompt, steps, progress=False)
    out = replacement_edit(pipe, inv_prompt, tgt, traj[-1], hooks, steps, guidance,
                           callbacks=[AnchorSource(traj)], progress=False)
    return image, decode(pipe, out[1:])


# ------------------------------------------------------------------------------------------ SDEdit

def edit_sdedit(pipe, example, seed, cfg, image=None) -> Images:
    """SDEdit: the source latent noised to the strength's timestep (``add_noise`` with the seed's
    generator), then denoised with the target prompt over the remaining DDIM steps."""
    steps, guidance = steps_guidance(cfg)
    strength = float(cfg_get(cfg, "strength", 0.5))
    src, tgt = example.source_prompt, example.target_prompt
    check_prompts(pipe.tokenizer, [src, tgt])
    uncond = encode_prompts(pipe, [""]) if guidance > 1 else None
    if image is None:
        generated = sample(pipe, [src], [seed], num_inference_steps=steps, guidance_scale=guidance, progress=False)
        z0, source = generated.latents, generated.images
    else:
        z0, source = encode_image(pipe, image), image
    scheduler = FromStep.from_config(pipe.scheduler.config)
    scheduler.t_start = sdedit_start(steps, strength)
    if scheduler.t_start >= steps:
        return source, source.clone()
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[:1]  # the strength's timestep: the first one left
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(int(seed))).to(z0)
    z_t = scheduler.add_noise(z0, noise, t.to(z0.device))
    out = denoise(pipe, z_t, encode_prompts(pipe, [tgt]), uncond, steps, guidance, progress=False, scheduler=scheduler)
    return source, decode(pipe, out)


# ---------------------------------------------------------------------------------------- registry

METHODS: dict[str, Callable] = {
    "fpe": edit_fpe,
    "p2p": edit_p2p,
    "masactrl": edit_masactrl,
    "pnp": edit_pnp,
    "sdedit": edit_sdedit,
    "diffedit": edit_diffedit,
    "pix2pix_zero": edit_pix2pix_zero,
    "instructpix2pix": InstructPix2Pix,  # a class: each get_method() call makes an instance that holds its model
}

def method_key(name: str) -> str:
    """Config name → registry key: ``sdedit_0.5`` / ``sdedit_0.75`` → ``sdedit``."""
    return "sdedit" if str(name).startswith("sdedit") else str(name)


def get_method(name: str) -> Callable:
    """The edit callable of config name ``name`` (a fresh instance for methods that hold a model)."""
    key = method_key(name)
    if key not in METHODS:
        raise UserError(f"method {name!r} is not implemented; implemented: {', '.join(METHODS)} "
                        "(configs: fpe, p2p, masactrl, pnp, sdedit_0.5, sdedit_0.75, diffedit, pix2pix_zero, "
                        "instructpix2pix)")
    method = METHODS[key]
    return method() if isinstance(method, type) else method
