"""Figure 3: the generated image, per-word cross-attention maps, and the top SVD components of a self map.

``python -m experiments.run experiment=attention_maps prompt="a white horse in the park"`` writes
``attention_maps.png`` (and the arrays as ``attention_maps.npz``) to ``cfg.paths.output_dir``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from experiments.common import load_model, output_dir, plain
from probing.attention_maps import (
    AttentionMaps,
    capture_attention_maps,
    prompt_words,
    top_components,
)
from sdattn.errors import UserError
from sdattn.layers import enumerate_layers, select_layers
from sdattn.sampling import latent_size


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


def run(cfg: DictConfig) -> dict:
    """Returns ``{"png", "npz": paths, "words", "cross_layers", "self_layer", "shapes": {array: shape}}``."""
    a = cfg.attention_maps
    prompt = str(cfg.get("prompt") or "").strip()
    if not prompt:
        raise UserError("prompt is empty: pass prompt=\"a white horse in the park\"")
    words = prompt_words(prompt, plain(a.get("words")))  # checked before the model loads
    pipe = load_model(cfg)
    lat = latent_size(pipe)
    layers = enumerate_layers(pipe.unet, lat)
    cross_layers = select_layers(layers, plain(a.cross_layers), "cross", plain(a.cross_resolution))
    if not cross_layers:
        sides = sorted({x.resolution for x in layers if x.kind == "cross"})
        raise UserError(f"no cross layer among attention_maps.cross_layers={plain(a.cross_layers)!r} has "
                        f"resolution {plain(a.cross_resolution)!r}; resolutions of this model's cross layers: {sides}")
    self_layers = select_layers(layers, plain(a.self_layer), "self")
    if len(self_layers) != 1:
        raise UserError(f"attention_maps.self_layer={plain(a.self_layer)!r} must name one self-attention layer")
    self_layer = self_layers[0]
    maps = capture_attention_maps(pipe, prompt, int(cfg.seed), cross_layers, self_layer, words,
                                  plain(a.cross_steps), plain(a.self_steps), int(a.num_inference_steps),
                                  float(a.guidance_scale), progress=bool(cfg.progress))
    comps, sigma = top_components(maps.self_map, (self_layer.height, self_layer.width), int(a.components))
    out = output_dir(cfg)
    png = plot_figure(maps, comps.numpy(), sigma.numpy(), out / str(a.filename), prompt, float(a.alpha))
    npz = png.with_suffix(".npz")
    arrays = {"image": maps.image.numpy(), "cross": maps.cross.numpy(), "self_map": maps.self_map.numpy(),
              "components": comps.numpy(), "singular_values": sigma.numpy()}
    np.savez_compressed(npz, words=np.array(maps.words), **arrays)
    print(f"cross layers {[x.label for x in cross_layers]}, self layer {self_layer.label}; figure written to {png}")
    return {"png": str(png), "npz": str(npz), "words": maps.words, "cross_layers": [x.label for x in cross_layers],
            "self_layer": self_layer.label, "shapes": {k: tuple(v.shape) for k, v in arrays.items()},
            "out_dir": str(out)}
