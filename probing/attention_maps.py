"""Figure 3 maps: per-word cross-attention heat maps and the principal components of a self-attention map.

Cross: softmax(QKᵀ/√d) of the conditional branch, mean over heads, mean over each word's tokens,
resized (bilinear) to the largest grid among the chosen layers, then averaged over layers and steps.
Self: one layer's full (N × N) map of the conditional branch (rows: queries, softmax over keys),
mean over heads, averaged over steps; :func:`top_components` gives its top left singular vectors,
each reshaped to the layer's (h, w) grid. Everything is captured in one sampling run by the attention
recorder (:mod:`sdattn.recorder`), which leaves the layers' outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdattn.errors import UserError
from sdattn.layers import LayerId, select_layers
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import sample
from sdattn.steps import parse_steps
from sdattn.text import word_token_positions

from .capture import token_weights


@dataclass
class AttentionMaps:
    """One generated image and its attention maps."""

    image: torch.Tensor  # (3, H, W) in [0, 1]
    words: list[str]
    cross: torch.Tensor  # (T, h, w): word t's map, averaged over layers, heads, tokens and steps
    self_map: torch.Tensor  # (N, N) with N = self_layer.tokens; rows are queries and sum to 1
    cross_layers: list[LayerId]
    self_layer: LayerId


def prompt_words(prompt: str, words: Sequence[str] | None = None) -> list[str]:
    """The words to show: ``words`` (each must be in the prompt) or every distinct word of the prompt."""
    available = prompt.split()
    if words is None:
        first: dict[str, str] = {}
        for w in available:
            first.setdefault(w.lower(), w)  # one panel per distinct word (its first occurrence)
        return list(first.values())
    words = [str(w) for w in words]
    if not words:
        raise UserError(f"attention_maps.words is empty: name words of the prompt {prompt!r}, or null for all")
    lower = [w.lower() for w in available]
    for w in words:
        if w.lower() not in lower:
            raise UserError(f"word {w!r} is not in the prompt {prompt!r}; words there: {available}")
    return words


def figure_layers(layers: Sequence[LayerId], cross_layers, cross_resolution,
                  self_layer) -> tuple[list[LayerId], LayerId]:
    """The figure's cross layers (the ``cross_layers`` spec at ``cross_resolution``) and its one self layer
    (the ``self_layer`` spec) among ``layers``; a spec that picks none (or several self layers) is refused."""
    cross = select_layers(layers, cross_layers, "cross", cross_resolution)
    if not cross:
        sides = sorted({x.resolution for x in layers if x.kind == "cross"})
        raise UserError(f"no cross layer among attention_maps.cross_layers={cross_layers!r} has "
                        f"resolution {cross_resolution!r}; resolutions of this model's cross layers: {sides}")
    chosen = select_layers(layers, self_layer, "self")
    if len(chosen) != 1:
        raise UserError(f"attention_maps.self_layer={self_layer!r} must name one self-attention layer")
    return cross, chosen[0]


def capture_attention_maps(
    pipe,
    prompt: str,
    seed: int,
    cross_layers: Sequence[LayerId],
    self_layer: LayerId,
    words: Sequence[str] | None = None,
    cross_steps="all",
    self_steps="all",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    progress: bool = False,
) -> AttentionMaps:
    """Generate ``prompt`` once and return the image with its cross maps per word and the self map."""
    words = prompt_words(prompt, words)
    if not words:
        raise UserError("the prompt is empty: give a prompt with at least one word")
    for w in words:
        word_token_positions(pipe.tokenizer, prompt, w)  # every word must have tokens (one-line error otherwise)
    if any(x.kind != "cross" for x in cross_layers) or not cross_layers:
        raise UserError(f"cross layers must be a non-empty list of cross-attention layers, got "
                        f"{[x.label for x in cross_layers]}")
    if self_layer.kind != "self":
        raise UserError(f"layer {self_layer.label} is not a self-attention layer")
    size = (max(x.height for x in cross_layers), max(x.width for x in cross_layers))
    csteps = parse_steps(cross_steps, num_inference_steps, key="attention_maps.cross_steps")
    ssteps = parse_steps(self_steps, num_inference_steps, key="attention_maps.self_steps")
    weights = token_weights(pipe.tokenizer, [prompt], [words])  # (1, T, L)
    rec = Recorder([Tap(cross_layers, "probs", name="cross", steps=csteps, rows="cond", heads="mean", tokens=weights,
                        size=size, over_steps="mean"),
                    Tap([self_layer], "probs", name="self", steps=ssteps, rows="cond", heads="mean", float32=True,
                        over_steps="mean")])
    with rec.installed(pipe.unet):
        out = sample(pipe, [prompt], [seed], num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, callbacks=[rec], progress=progress)
    per_layer = rec["cross"]  # {label: (1, T, h, w)}, mean over steps
    cross = torch.stack([per_layer[x.label][0] for x in cross_layers]).mean(0)  # (T, h, w)
    self_map = rec["self"][self_layer.label][0]  # (N, N)
    return AttentionMaps(out.images[0], words, cross, self_map, list(cross_layers), self_layer)


def top_components(self_map: torch.Tensor, hw: tuple[int, int], k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors of an (N, N) map as (k, h, w) images, and their singular values (k,).

    Each vector's sign is chosen so that its largest-magnitude entry is positive (SVD leaves it free).
    """
    n = self_map.shape[0]
    h, w = hw
    if self_map.shape != (n, n) or n != h * w:
        raise UserError(f"self-attention map of shape {tuple(self_map.shape)} does not match a {h}x{w} grid")
    k = min(k, n)
    u, s, _ = torch.linalg.svd(self_map.double())
    u = u[:, :k]  # (N, k), orthonormal columns
    peak = u.gather(0, u.abs().argmax(0, keepdim=True))  # (1, k)
    u = u * torch.where(peak < 0, -1.0, 1.0)
    return u.T.reshape(k, h, w).float(), s[:k].float()
