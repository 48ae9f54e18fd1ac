"""Figure 3 drawn: the generated image with each word's cross-attention map over it (row 1) and the top
singular vectors of one self-attention map (row 2); the arrays beside it as ``.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .attention_maps import AttentionMaps


def plot_figure(maps: AttentionMaps, components: np.ndarray, sigma: np.ndarray, path: Path, prompt: str,
                alpha: float = 0.55, dpi: int = 120) -> Path:
    """Row 1: image and per-word heat maps over it; row 2: the self map's components. components: (k, h, w)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend is switched

    image = maps.image.permute(1, 2, 0).numpy()  # (H, W, 3)
    H, W = image.shape[:2]
    cross = maps.cross.numpy()  # (T, h, w)
    ncols = 1 + max(len(maps.words), len(components))
    fig = Figure(figsize=(2.0 * ncols, 4.6))
    axes = fig.subplots(2, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("(a) image", fontsize=9)
    for t, word in enumerate(maps.words):
        m = cross[t]
        m = (m - m.min()) / (m.max() - m.min() + 1e-12)  # per-panel scale: shapes, not magnitudes
        ax = axes[0, 1 + t]
        ax.imshow(image)
        ax.imshow(m, cmap="jet", alpha=alpha, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="bilinear")
        ax.set_title(f"“{word}”", fontsize=9)
    layer = maps.self_layer
    axes[1, 0].text(0.5, 0.5, f"(c) {layer.label}\n{layer.block}, {layer.height}×{layer.width}\n"
                    f"top-{len(components)} left\nsingular vectors", ha="center", va="center", fontsize=8,
                    transform=axes[1, 0].transAxes)
    for i, comp in enumerate(components):
        lim = float(np.abs(comp).max()) or 1.0
        axes[1, 1 + i].imshow(comp, cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        axes[1, 1 + i].set_title(f"u{i + 1} (σ={sigma[i]:.3g})", fontsize=8)
    cross_labels = ",".join(str(x.index) for x in maps.cross_layers)
    res = sorted({f"{x.height}×{x.width}" for x in maps.cross_layers})
    fig.suptitle(f"{prompt!r} — (b) cross-attention per word, layers {cross_labels} ({'/'.join(res)}), "
                 "mean over heads, layers, steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def save_arrays(maps: AttentionMaps, components: np.ndarray, sigma: np.ndarray, path: Path) -> dict[str, tuple]:
    """The figure's arrays (image, cross, self_map, components, singular_values, words) as ``path`` (.npz);
    → {array: shape}."""
    arrays = {"image": maps.image.numpy(), "cross": maps.cross.numpy(), "self_map": maps.self_map.numpy(),
              "components": components, "singular_values": sigma}
    np.savez_compressed(path, words=np.array(maps.words), **arrays)
    return {k: tuple(v.shape) for k, v in arrays.items()}
