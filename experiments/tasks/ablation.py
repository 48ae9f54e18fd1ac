"""Attention-replacement ablations (Liu et al. §3.4–3.6, Fig. 4–5): one grid row per layer range
(cross or self maps of the target ← source) or per token edit (replace / subtract a token's
cross-attention map); one column per seed, plus the source and the plain target.
The library: :mod:`editing.ablation`."""

from __future__ import annotations

from omegaconf import DictConfig

from editing.ablation import Ablation, ablation_grid
from editing.grid import labelled_grid
from experiments.common import load_model, output_dir, plain


def run(cfg: DictConfig) -> dict:
    """Writes ``<name>.png`` (labelled grid) and returns the per-row final latents."""
    a = Ablation.from_settings(plain(cfg.ablation))
    pipe = load_model(cfg)
    grid, labels, latents = ablation_grid(pipe, a, progress=bool(cfg.progress))
    out = output_dir(cfg) / f"{a.name}.png"
    labelled_grid(grid, cell=a.cell, row_labels=labels).save(out)
    rows = labels[2:]  # after the source and the plain target
    print(f"{a.name}: {len(rows)} rows × {len(a.seeds)} seeds → {out}")
    return {"file": out, "rows": rows, "latents": latents}
