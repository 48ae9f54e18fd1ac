"""Capture attention features during sampling, through the attention recorder (:mod:`sdattn.recorder`).

Cross-attention: for each requested word, softmax(QKᵀ/√d) of the conditional branch, mean over
heads, mean over the word's tokens, averaged over the capture steps, reshaped to the layer's
(h, w) grid and bilinearly resized to ``grid × grid`` → ``grid²`` features.

Self-attention: the (hw × hw) map of the conditional branch, mean over heads, average-pooled over
query positions *and* key positions to ``pool × pool`` grids → ``pool⁴`` features.

No full map is ever held (the reductions are :mod:`sdattn.maps`'): cross maps of words are SDPA with
the token weights as values; pooled self maps are SDPA with the key-pooling matrix as values (CUDA), or
per query chunk the probabilities averaged over heads and pooled, the layer's output made from the same
probabilities (CPU). Sums over the capture steps stay on the device until the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdattn.errors import UserError
from sdattn.layers import LayerId
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import sample
from sdattn.steps import parse_steps
from sdattn.text import word_token_positions


@dataclass
class CaptureSpec:
    """What to capture. ``kind``: "cross" or "self"; ``tokens``: word specs for cross maps."""

    kind: str = "cross"
    tokens: Sequence[str] = ("{cls}",)
    steps: object = "all"
    grid: int = 16
    pool: int = 8


def token_weights(tokenizer, prompts: Sequence[str], words: Sequence[Sequence[str]]) -> torch.Tensor:
    """(B, T, L) weights averaging the tokens of word t of prompt b (L = tokenizer max length)."""
    L = tokenizer.model_max_length
    w = torch.zeros(len(prompts), max(len(x) for x in words), L)
    for b, (prompt, ws) in enumerate(zip(prompts, words)):
        for t, word in enumerate(ws):
            pos = word_token_positions(tokenizer, prompt, word)
            w[b, t, pos] = 1.0 / len(pos)
    return w


def capture_features(
    pipe,
    layers: Sequence[LayerId],
    spec: CaptureSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    words: Sequence[Sequence[str]] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Sample ``prompts`` and return ``{layer label: features}``.

    cross: (B, T, grid²) for the T words of each prompt (``words[b]``); self: (B, pool⁴).
    """
    steps = parse_steps(spec.steps, num_inference_steps, key="probe.steps")
    if spec.kind not in ("cross", "self"):
        raise UserError(f"capture kind {spec.kind!r} is not one of ['cross', 'self']")
    wrong = [x.label for x in layers if x.kind != spec.kind]
    if wrong:
        raise UserError(f"layer {wrong[0]} is not a {spec.kind}-attention layer")
    if spec.kind == "cross":
        if words is None:
            raise UserError("cross-attention capture needs the words to capture")
        tap = Tap(layers, "probs", steps=steps, rows="cond", heads="mean", over_steps="mean",
                  tokens=token_weights(pipe.tokenizer, prompts, words), size=(spec.grid, spec.grid))
    else:
        tap = Tap(layers, "probs", steps=steps, rows="cond", heads="mean", over_steps="mean", pool=spec.pool)
    rec = Recorder([tap])
    with rec.installed(pipe.unet):
        sample(pipe, prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               callbacks=[rec], progress=progress, decode_images=False)
    return {label: x.flatten(1 if spec.kind == "self" else 2) for label, x in rec["probs"].items()}
