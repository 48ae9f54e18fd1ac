"""Capture attention features during sampling, through the shared hook layer.

Cross-attention: for each requested word, softmax(QKᵀ/√d) of the conditional branch, mean over
heads, mean over the word's tokens, averaged over the capture steps, reshaped to the layer's
(h, w) grid and bilinearly resized to ``grid × grid`` → ``grid²`` features.

Self-attention: the (hw × hw) map of the conditional branch, mean over heads, average-pooled over
query positions *and* key positions to ``pool × pool`` grids → ``pool⁴`` features.

No full map is ever held: pooling is linear, so the key-pooled map of all heads is either one SDPA
call with the key-pooling matrix as its values, softmax(QKᵀ/√d)·P (CUDA: fused kernels, no map at
all), or, per query chunk of bounded size, the chunk's probabilities averaged over heads times P
(CPU: fewer FLOPs with narrow heads); the query pooling is one matmul. Cross maps of words are SDPA
with the token weights as values. Sums over the capture steps stay on the device until the end (no
host sync per layer and step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdattn.errors import UserError
from sdattn.hooks import AttentionHook, HookSet, StepState
from sdattn.layers import LayerId
from sdattn.sampling import sample


def parse_steps(spec, num_steps: int) -> set[int]:
    """``"all"``, a list of 0-based step indices, or ``"a-b"`` → set of steps in 0..num_steps-1."""
    if spec is None or spec == "all":
        return set(range(num_steps))
    if isinstance(spec, str) and "-" in spec:
        lo, hi = (int(x) for x in spec.split("-"))
        steps = set(range(lo, hi + 1))
    else:
        steps = {int(s) for s in ([spec] if isinstance(spec, int) else spec)}
    bad = sorted(s for s in steps if not 0 <= s < num_steps)
    if bad:
        raise UserError(f"capture step {bad[0]} is outside 0..{num_steps - 1}")
    return steps


class StepAccumulator:
    """Running sums of one feature per layer over the captured steps."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()  # stays on its device: no host sync per call
        if key in self.sums:
            self.sums[key] += value
            self.counts[key] += 1
        else:
            self.sums[key], self.counts[key] = value.clone(), 1

    def means(self) -> dict[str, torch.Tensor]:
        """Mean of each feature over the captured steps, float32 on CPU."""
        return {k: (v / self.counts[k]).cpu() for k, v in self.sums.items()}


def attend_to(query: torch.Tensor, key: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(QKᵀ·scale)·values without materialising the map, mean over heads.

    query (B, H, N, d), key (B, H, M, d), values (B or 1, M, V) shared by the heads → (B, N, V) float32.
    The values' width is padded to a multiple of 8 so fused SDPA kernels accept it.
    """
    b, heads = query.shape[:2]
    width = values.shape[-1]
    values = F.pad(values.to(query.dtype), (0, -width % 8))
    out = F.scaled_dot_product_attention(query, key, values[:, None].expand(b, heads, -1, -1), scale=scale)
    return out[..., :width].float().mean(1)


def pooling_matrix(hw: tuple[int, int], pool: int, device=None) -> torch.Tensor:
    """(h·w, pool²) float32: column (i, j) averages the grid cells of ``adaptive_avg_pool2d``'s bin (i, j)."""
    h, w = hw
    ph = F.adaptive_avg_pool1d(torch.eye(h, device=device)[:, None], pool)[:, 0]  # (h, pool)
    pw = F.adaptive_avg_pool1d(torch.eye(w, device=device)[:, None], pool)[:, 0]  # (w, pool)
    return torch.einsum("yi,xj->yxij", ph, pw).reshape(h * w, pool * pool)


def token_maps(attn, query, key, rows: slice, weights: torch.Tensor, layer: LayerId,
               size: tuple[int, int]) -> torch.Tensor:
    """Cross-attention maps of words, mean over heads and each word's tokens, resized to ``size``.

    query (B', H, N, d), key (B', H, L, d), ``rows`` of the batch to use, weights (B, T, L) → (B, T, *size).
    """
    maps = attend_to(query[rows], key[rows], weights.to(query.device).transpose(1, 2), attn.scale)  # (B, N, T)
    maps = maps.transpose(1, 2)  # (B, T, N)
    b, t, _ = maps.shape
    maps = maps.reshape(b * t, 1, layer.height, layer.width)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps.reshape(b, t, *size)


class CrossMapCapture(AttentionHook):
    """Records token cross-attention maps of the conditional branch; output unchanged (SDPA)."""

    def __init__(self, layer: LayerId, state: StepState, acc: StepAccumulator, token_weights: torch.Tensor,
                 steps: set[int], grid: int):
        super().__init__(layer, state)
        self.acc, self.weights, self.steps, self.grid = acc, token_weights, steps, grid

    def attend(self, attn, query, key, value, mask):
        out = super().attend(attn, query, key, value, mask)
        if self.state.step in self.steps:
            maps = token_maps(attn, query, key, self.state.layout.cond_rows, self.weights, self.layer,
                              (self.grid, self.grid))
            self.acc.add(self.layer.label, maps.flatten(2))
        return out


def pooled_self_attention(query, key, scale: float, hw: tuple[int, int], pool: int, chunk: int | None = None,
                          method: str | None = None, chunk_bytes: int = 2 ** 20) -> torch.Tensor:
    """Mean-over-heads self-attention map pooled to (pool², pool²), never holding a map per head.

    ``method="sdpa"``: per query chunk, one SDPA call with the key-pooling matrix as values (fused
    kernels, no map at all: compute-bound; the default on CUDA). ``"chunked"``: per query chunk the
    (B, H, c, N) probabilities in the input dtype (``c`` from ``chunk``, else the most rows within
    ``chunk_bytes``), mean over heads, keys average-pooled (fewer FLOPs when heads are narrow: the
    default elsewhere). Both pool the queries with one matmul at the end.

    query/key: (B, H, N, d) → (B, pool⁴) float32, ordered (query bin, key bin).
    """
    b, heads, n, _ = query.shape
    method = method or ("sdpa" if query.is_cuda else "chunked")
    if method not in ("sdpa", "chunked"):
        raise UserError(f"pooled self-attention method {method!r} is not one of ['sdpa', 'chunked']")
    pooling = pooling_matrix(hw, pool, query.device)  # (N, pool²)
    if chunk is None:
        chunk = n if method == "sdpa" else max(1, chunk_bytes // (b * heads * n * query.element_size()))
    parts = []
    for s in range(0, n, chunk):
        q = query[:, :, s:s + chunk]
        if method == "sdpa":
            parts.append(attend_to(q, key, pooling[None], scale))
        else:
            probs = torch.softmax(q @ key.transpose(-1, -2) * scale, -1).float().mean(1)  # (B, c, N): one chunk
            c = probs.shape[1]
            parts.append(F.adaptive_avg_pool2d(probs.reshape(b * c, 1, *hw), pool).reshape(b, c, pool * pool))
    key_pooled = torch.cat(parts, 1)  # (B, N queries, pool² keys)
    return (pooling.T @ key_pooled).reshape(b, -1)  # (B, pool² queries, pool² keys)


def attention_with_pooled_map(query, key, value, scale: float, hw: tuple[int, int], pool: int,
                              chunk_bytes: int = 2 ** 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the pooled map of the same probabilities, per query chunk of at most
    ``chunk_bytes`` of probabilities (the map is computed once and used twice).

    query/key/value: (B, H, N, d) → ((B, H, N, d) output, (B, pool⁴) as :func:`pooled_self_attention`).
    """
    b, heads, n, _ = query.shape
    chunk = max(1, chunk_bytes // (b * heads * n * query.element_size()))
    outs, parts = [], []
    for s in range(0, n, chunk):
        probs = torch.softmax(query[:, :, s:s + chunk] @ key.transpose(-1, -2) * scale, -1)  # (B, H, c, N)
        outs.append(probs @ value)
        mean = probs.float().mean(1)  # (B, c, N)
        c = mean.shape[1]
        parts.append(F.adaptive_avg_pool2d(mean.reshape(b * c, 1, *hw), pool).reshape(b, c, pool * pool))
    pooling = pooling_matrix(hw, pool, query.device)  # (N, pool²)
    return torch.cat(outs, 2), (pooling.T @ torch.cat(parts, 1)).reshape(b, -1)


class SelfMapCapture(AttentionHook):
    """Records pooled self-attention maps of the conditional branch; output unchanged (SDPA; off CUDA
    the conditional rows' output comes from the same probabilities the map is pooled from, equal to
    SDPA up to float rounding, so the map costs no second QKᵀ)."""

    def __init__(self, layer: LayerId, state: StepState, acc: StepAccumulator, steps: set[int], pool: int):
        super().__init__(layer, state)
        self.acc, self.steps, self.pool = acc, steps, pool

    def attend(self, attn, query, key, value, mask):
        if self.state.step not in self.steps:
            return super().attend(attn, query, key, value, mask)
        rows, hw = self.state.layout.cond_rows, (self.layer.height, self.layer.width)
        if query.is_cuda or mask is not None:  # fused kernels: SDPA, plus SDPA with pooling values
            out = super().attend(attn, query, key, value, mask)
            feat = pooled_self_attention(query[rows], key[rows], attn.scale, hw, self.pool)
        else:
            out_cond, feat = attention_with_pooled_map(query[rows], key[rows], value[rows], attn.scale, hw,
                                                       self.pool)
            out = out_cond
            if self.state.layout.cfg:  # rows [uncond × n, cond × n]: plain SDPA for the uncond half
                uncond = slice(0, rows.start)
                out = torch.cat([super().attend(attn, query[uncond], key[uncond], value[uncond], mask), out_cond])
        self.acc.add(self.layer.label, feat)
        return out


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
    from .prompts import word_token_positions

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
    steps = parse_steps(spec.steps, num_inference_steps)
    acc = StepAccumulator()
    if spec.kind == "cross":
        if words is None:
            raise UserError("cross-attention capture needs the words to capture")
        weights = token_weights(pipe.tokenizer, prompts, words)

        def factory(layer, state):
            return CrossMapCapture(layer, state, acc, weights, steps, spec.grid)
    elif spec.kind == "self":
        def factory(layer, state):
            return SelfMapCapture(layer, state, acc, steps, spec.pool)
    else:
        raise UserError(f"capture kind {spec.kind!r} is not one of ['cross', 'self']")
    wrong = [x.label for x in layers if x.kind != spec.kind]
    if wrong:
        raise UserError(f"layer {wrong[0]} is not a {spec.kind}-attention layer")
    with HookSet(pipe.unet, layers, factory) as hooks:
        sample(pipe, prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               callbacks=[hooks], progress=progress, decode_images=False)
    return acc.means()
