"""Figure 3: the generated image, per-word cross-attention maps, and the top SVD components of a self map.

``python -m experiments.run experiment=attention_maps prompt="a white horse in the park"`` writes
``attention_maps.png`` (and the arrays as ``attention_maps.npz``) to ``cfg.paths.output_dir``.
The library: :mod:`probing.attention_maps` (the maps), :mod:`probing.figure3` (the figure).
"""

from __future__ import annotations

from omegaconf import DictConfig

from experiments.common import load_model, output_dir, plain
from probing.attention_maps import capture_attention_maps, figure_layers, prompt_words, top_components
from probing.figure3 import plot_figure, save_arrays
from sdattn.errors import UserError
from sdattn.layers import enumerate_layers
from sdattn.sampling import latent_size


def run(cfg: DictConfig) -> dict:
    """Returns ``{"png", "npz": paths, "words", "cross_layers", "self_layer", "shapes": {array: shape}}``."""
    a = cfg.attention_maps
    prompt = str(cfg.get("prompt") or "").strip()
    if not prompt:
        raise UserError("prompt is empty: pass prompt=\"a white horse in the park\"")
    words = prompt_words(prompt, plain(a.get("words")))  # checked before the model loads
    pipe = load_model(cfg)
    cross_layers, self_layer = figure_layers(enumerate_layers(pipe.unet, latent_size(pipe)), plain(a.cross_layers),
                                             plain(a.cross_resolution), plain(a.self_layer))
    maps = capture_attention_maps(pipe, prompt, int(cfg.seed), cross_layers, self_layer, words,
                                  plain(a.cross_steps), plain(a.self_steps), int(a.num_inference_steps),
                                  float(a.guidance_scale), progress=bool(cfg.progress))
    comps, sigma = top_components(maps.self_map, (self_layer.height, self_layer.width), int(a.components))
    out = output_dir(cfg)
    png = plot_figure(maps, comps.numpy(), sigma.numpy(), out / str(a.filename), prompt, float(a.alpha))
    npz = png.with_suffix(".npz")
    shapes = save_arrays(maps, comps.numpy(), sigma.numpy(), npz)
    print(f"cross layers {[x.label for x in cross_layers]}, self layer {self_layer.label}; figure written to {png}")
    return {"png": str(png), "npz": str(npz), "words": maps.words, "cross_layers": [x.label for x in cross_layers],
            "self_layer": self_layer.label, "shapes": shapes, "out_dir": str(out)}
