"""Free-Prompt-Editing (Liu et al. §4): Alg. 1 (generated images), Alg. 2 (real images) and
:func:`edit_fpe`, the benchmark entry (``configs/method/fpe.yaml``). On the shared two-branch
machinery (:mod:`editing.two_branch`): the step index comes from the sampling loop, layers from
``LayerId`` selectors."""

from __future__ import annotations

import torch

from sdattn.errors import UserError
from sdattn.layers import select_layers
from sdattn.sampling import check_prompts, decode, encode_image, initial_latents
from sdattn.steps import parse_steps

from .inversion import ddim_invert, null_text_inversion
from .replace import AttentionReplace
from .two_branch import SOURCE, TARGET, AnchorSource, EditResult, Images, model_layers, replacement_edit

INVERSIONS = ("ddim", "null_text")
REAL_SOURCE_PROMPTS = ("empty", "dataset")


def self_replace_hooks(pipe, layers, steps, num_inference_steps: int) -> dict:
    """FPE's hooks: self-attention map of the target ← source on ``layers`` during ``steps``."""
    chosen = select_layers(model_layers(pipe), layers, "self")
    active = parse_steps(steps, num_inference_steps, "fraction", "self_replace_steps")
    return {layer: (lambda lay, st: AttentionReplace(lay, st, [(SOURCE, TARGET)], active)) for layer in chosen}


def fpe_generated(
    pipe,
    source_prompt: str,
    target_prompt: str,
    seed: int,
    *,
    layers,
    self_replace_steps,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    progress: bool = True,
) -> EditResult:
    """Alg. 1: source and target from one initial latent; the target's conditional branch uses
    the source's self-attention maps on ``layers`` for the first ``self_replace_steps`` (the settings of
    ``configs/method/fpe.yaml``)."""
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
    *,
    layers,
    self_replace_steps,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    null_text: dict | None = None,
    progress: bool = True,
) -> EditResult:
    """Alg. 2: ``image`` (1, 3, H, W) in [0, 1] → VAE latent → inversion → edit.

    ``inversion="ddim"``: DDIM inversion with ``source_prompt`` (default: empty, as the paper)
    and the source branch re-anchored to the trajectory at each step (official code).
    ``inversion="null_text"`` (official ``null_text_w_FPE.ipynb``): DDIM inversion with the source
    caption, then null-text inversion with the official schedule (``configs/null_text/official.yaml``,
    ``null_text`` overrides keys); the source branch is not anchored but follows the trajectory
    through the optimised unconditional embeddings.
    """
    if inversion not in INVERSIONS:
        raise UserError(f"edit.inversion {inversion!r} is not one of {list(INVERSIONS)}")
    if inversion == "null_text" and not source_prompt.strip():
        raise UserError("null-text inversion needs the source caption (edit.source_prompt), as the official code")
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


def edit_fpe(pipe, example, seed: int, image: torch.Tensor | None = None, *, layers, self_replace_steps,
             inversion: str, real_source_prompt: str, null_text: dict | None, num_inference_steps: int,
             guidance_scale: float) -> Images:
    """Benchmark entry: FPE on one pair → (source, edited). Generated pairs (``image is None``): Alg. 1
    from ``seed``; real pairs: Alg. 2 on ``image`` (1, 3, H, W), which is returned as the source.
    ``real_source_prompt`` (``inversion=ddim``): ``empty`` inverts with "" and uses it for the source
    branch (paper and official code); ``dataset`` uses the pair's source prompt. ``inversion=null_text``
    always inverts with the pair's source prompt (official ``null_text_w_FPE.ipynb``)."""
    if real_source_prompt not in REAL_SOURCE_PROMPTS:
        raise UserError(f"method.real_source_prompt {real_source_prompt!r} is not one of {list(REAL_SOURCE_PROMPTS)}")
    common = dict(layers=layers, self_replace_steps=self_replace_steps, num_inference_steps=int(num_inference_steps),
                  guidance_scale=float(guidance_scale), progress=False)
    if image is None:
        r = fpe_generated(pipe, example.source_prompt, example.target_prompt, seed, **common)
        return r.images["source"], r.images["edited"]
    src = example.source_prompt if real_source_prompt == "dataset" or inversion == "null_text" else ""
    r = fpe_real(pipe, image, example.target_prompt, src, inversion, null_text=null_text, **common)
    return image, r.images["edited"]
