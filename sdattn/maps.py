"""Attention maps computed already reduced, never holding more of the map than the reduction needs.

softmax(QKᵀ·scale) of (B, H, N, d) queries and (B, H, M, d) keys is (B, H, N, M): large for self layers
(N = M = h·w). The reductions the recorder (:mod:`sdattn.recorder`) asks for are linear in the map, so:

- weighted sums over the keys (a word's tokens) are one SDPA call with the weights as values
  (:func:`attend_to`: fused kernels, no map at all);
- maps average-pooled over queries and keys (:func:`pooled_self_attention`) are SDPA with the
  key-pooling matrix as values (CUDA), or per query chunk of bounded size the chunk's probabilities
  averaged over heads and key-pooled (CPU: fewer FLOPs with narrow heads), then one matmul pools the
  queries; :func:`attention_with_pooled_map` also returns the attention output of the same
  probabilities, so a recorded layer pays one QKᵀ;
- the full head-mean map is built per query chunk (:func:`mean_map`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import UserError


def probabilities(query: torch.Tensor, key: torch.Tensor, scale: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QKᵀ·scale + mask): (B, H, N, d), (B, H, M, d) → (B, H, N, M) in the inputs' dtype; ``mask``
    an additive attention mask broadcastable to the logits (diffusers' prepared mask), or None."""
    logits = query @ key.transpose(-1, -2) * scale
    return torch.softmax(logits if mask is None else logits + mask, -1)


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


def pool_map(probs: torch.Tensor, hw: tuple[int, int], pool: int) -> torch.Tensor:
    """A materialised self-attention map (..., N, N) average-pooled over queries and keys → (..., pool², pool²)."""
    pooling = pooling_matrix(hw, pool, probs.device)  # (N, pool²)
    return pooling.T @ probs.float() @ pooling


def mean_map(query: torch.Tensor, key: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Mean-over-heads attention probabilities, per query chunk: (B, H, N, d), (B, H, M, d) → (B, N, M) float32."""
    rows = [torch.softmax(query[:, :, s:s + chunk] @ key.transpose(-1, -2) * scale, -1).float().mean(1)
            for s in range(0, query.shape[2], chunk)]
    return torch.cat(rows, 1)


def query_grid(maps: torch.Tensor, hw: tuple[int, int], size: tuple[int, int] | None) -> torch.Tensor:
    """Maps with queries last (..., N) → (..., h, w) on the layer's grid ``hw``, bilinearly resized to
    ``size`` when it differs (None: the layer's own grid)."""
    lead = maps.shape[:-1]
    maps = maps.reshape(-1, 1, *hw)
    if size is not None and tuple(size) != tuple(hw):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps.reshape(*lead, *maps.shape[-2:])
