"""Pictures for the page: heat maps over the image, signed components, a pixel marker and the probe
tables as heat maps. numpy in, uint8 (H, W, 3) or PIL out; no model, no Gradio."""

from __future__ import annotations

import numpy as np
from PIL import Image

COLORMAP = "jet"  # per-word maps, as Fig. 3 and experiment=attention_maps
DIVERGING = "coolwarm"  # signed SVD components


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) float in [0, 1] → (size, size·w/h, 3) uint8, bicubic."""
    img = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(img.resize((round(size * img.width / img.height), size), Image.BICUBIC))


def colorize(values: np.ndarray, cmap: str, lo: float, hi: float) -> np.ndarray:
    """(h, w) → (h, w, 3) float in [0, 1] through matplotlib's ``cmap`` on [lo, hi]."""
    from matplotlib import colormaps

    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return colormaps[cmap](np.clip(scaled, 0, 1))[..., :3]


def resize_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) float → (H, W) float, bilinear."""
    img = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.BILINEAR))


def overlay(image: np.ndarray, values: np.ndarray, alpha: float) -> np.ndarray:
    """A map (h, w) scaled to its own min..max, coloured and laid over ``image`` (H, W, 3) uint8 → uint8."""
    big = resize_map(values, image.shape[:2])
    heat = colorize(big, COLORMAP, float(values.min()), float(values.max()))
    return (image.astype(np.float32) * (1 - alpha) + heat * 255 * alpha).round().astype(np.uint8)


def component(values: np.ndarray, size: int) -> np.ndarray:
    """A signed (h, w) component on a diverging scale symmetric about 0, nearest-upscaled → uint8."""
    lim = float(np.abs(values).max()) or 1.0
    rgb = (colorize(values, DIVERGING, -lim, lim) * 255).round().astype(np.uint8)
    img = Image.fromarray(rgb)
    return np.asarray(img.resize((round(size * img.width / img.height), size), Image.NEAREST))


def mark(image: np.ndarray, x: float, y: float, radius: int = 4) -> np.ndarray:
    """A white ring with a black centre at fractions (``x``, ``y``) of ``image`` (H, W, 3) uint8."""
    out = image.copy()
    h, w = out.shape[:2]
    cy, cx = min(int(y * h), h - 1), min(int(x * w), w - 1)
    yy, xx = np.ogrid[:h, :w]
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    out[(d2 <= radius ** 2) & (d2 > (radius - 2) ** 2)] = 255
    out[d2 <= 1] = 0
    return out


def table_heatmaps(panels: list[tuple[str, object]], dpi: int = 100) -> Image.Image:
    """Accuracy tables (rows classes, columns layers; values in %) as heat maps side by side, each with its
    title and the value in every cell. ``panels``: [(title, DataFrame)], 0–100 % on one colour scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend is switched

    widths = [max(3.0, 0.62 * len(df.columns) + 1.6) for _, df in panels]
    height = max(2.5, 0.32 * max(len(df) for _, df in panels) + 1.2)
    fig = Figure(figsize=(sum(widths), height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})
    for ax, (title, df) in zip(axes[0], panels):
        values = df.to_numpy(dtype=float)
        ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(df.columns)), [str(c) for c in df.columns], fontsize=8)
        ax.set_yticks(range(len(df.index)), [str(r) for r in df.index], fontsize=8)
        for (r, c), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
