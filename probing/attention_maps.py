"""Figure 3 maps: per-word cross-attention heat maps and the principal components of a self-attention map.

Cross: softmax(QKᵀ/√d) of the conditional branch, mean over heads, mean over each word's tokens,
resized (bilinear) to the largest grid among the chosen layers, then averaged over layers and steps.
Self: one layer's full (N × N) map of the conditional branch (rows: queries, softmax over keys),
mean over heads, averaged over steps; :func:`top_components` gives its top left singular vectors,
each reshaped to the layer's (h, w) grid. Everything is captured in one sampling run through
:class:`sdattn.hooks.HookSet`; the hooks leave the layers' outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdattn.errors import UserError
from sdattn.hooks import AttentionHook, HookSet, StepState
from sdattn.layers import LayerId, LayerSelector
from sdattn.sampling import sample

from .capture import StepAccumulator, parse_steps, token_maps, token_weights
from .prompts import word_token_positions


@dataclass
class AttentionMaps:
    """One generated image and its attention maps."""

    image: torch.Tensor  # (3, H, W) in [0, 1]
    words: list[str]
    cross: torch.Tensor  # (T, h, w): word t's map, averaged over layers, heads, tokens and steps
    self_map: torch.Tensor  # (N, N) with N = self_layer.tokens; rows are queries and sum to 1
    cross_layers: list[LayerId]
    self_layer: LayerId


class CrossWordCapture(AttentionHook):
    """Adds each word's cross-attention map (mean over heads and the word's tokens) per step."""

    def __init__(self, layer: LayerId, state: StepState, acc: StepAccumulator, weights: torch.Tensor,
                 steps: set[int], size: tuple[int, int]):
        super().__init__(layer, state)
        self.acc, self.weights, self.steps, self.size = acc, weights, steps, size  # weights: (B, T, L)

    def attend(self, attn, query, key, value, mask):
        out = super().attend(attn, query, key, value, mask)
        if self.state.step in self.steps:
            maps = token_maps(attn, query, key, self.state.layout.cond_rows, self.weights, self.layer, self.size)
            self.acc.add(self.layer.label, maps)
        return out


def full_self_attention(query: torch.Tensor, key: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Mean-over-heads attention probabilities, computed in query chunks: (B, H, N, d) → (B, N, N)."""
    rows = [torch.softmax(query[:, :, s:s + chunk].float() @ key.float().transpose(-1, -2) * scale, -1).mean(1)
            for s in range(0, query.shape[2], chunk)]
    return torch.cat(rows, 1)


class SelfMapRecorder(AttentionHook):
    """Adds the full (N × N) self-attention map of the conditional branch, mean over heads, per step."""

    def __init__(self, layer: LayerId, state: StepState, acc: StepAccumulator, steps: set[int]):
        super().__init__(layer, state)
        self.acc, self.steps = acc, steps

    def attend(self, attn, query, key, value, mask):
        out = super().attend(attn, query, key, value, mask)
        if self.state.step in self.steps:
            rows = self.state.layout.cond_rows
            self.acc.add(self.layer.label, full_self_attention(query[rows], key[rows], attn.scale))  # (B, N, N)
        return out


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


def resolve_resolution(spec, latent_side: int) -> int | None:
    """A query-grid side: an int, ``"1/k"`` (latent side ÷ k) or ``null``/``"all"`` (any) → int or None."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return spec
    text = str(spec).strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text.startswith("1/") and text[2:].isdigit() and int(text[2:]) > 0:
        return max(1, latent_side // int(text[2:]))
    raise UserError(f"cross resolution {spec!r} is not a grid side (e.g. 16), a fraction of the latent side "
                    "like '1/4', or 'all'")


def select_cross_layers(layers: Sequence[LayerId], indices, resolution, latent_side: int) -> list[LayerId]:
    """Cross layers with the given indices whose query grid has side ``resolution`` (see :func:`resolve_resolution`)."""
    side = resolve_resolution(resolution, latent_side)
    chosen = LayerSelector(kinds="cross", indices=indices,
                           resolutions=None if side is None else [side]).select(layers)
    if not chosen:
        sides = sorted({x.resolution for x in layers if x.kind == "cross"})
        raise UserError(f"no cross layer among indices {indices!r} has resolution {resolution!r} (= {side}); "
                        f"resolutions of this model's cross layers: {sides}")
    return chosen


def self_layer_by_index(layers: Sequence[LayerId], index) -> LayerId:
    """The self-attention layer with 1-based ``index`` (SD numbering)."""
    mine = [x for x in layers if x.kind == "self"]
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= len(mine):
        raise UserError(f"self layer {index!r} is not a self-attention layer of this model: allowed 1..{len(mine)}")
    return mine[index - 1]


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
    csteps = parse_steps(cross_steps, num_inference_steps)
    ssteps = parse_steps(self_steps, num_inference_steps)
    size = (max(x.height for x in cross_layers), max(x.width for x in cross_layers))
    weights = token_weights(pipe.tokenizer, [prompt], [words])  # (1, T, L)
    cross_acc, self_acc = StepAccumulator(), StepAccumulator()

    def factory(layer: LayerId, state: StepState) -> AttentionHook:
        if layer == self_layer:
            return SelfMapRecorder(layer, state, self_acc, ssteps)
        return CrossWordCapture(layer, state, cross_acc, weights, csteps, size)

    with HookSet(pipe.unet, [*cross_layers, self_layer], factory) as hooks:
        out = sample(pipe, [prompt], [seed], num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, callbacks=[hooks], progress=progress)
    per_layer = cross_acc.means()  # {label: (1, T, h, w)}, mean over steps
    cross = torch.stack([per_layer[x.label][0] for x in cross_layers]).mean(0)  # (T, h, w)
    self_map = self_acc.means()[self_layer.label][0]  # (N, N)
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
