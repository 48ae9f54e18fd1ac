"""Does the toy world let layout come from the noise? A proxy measured with a VAE, before any training.

For every background and shape: render the object at one place in each colour (no pixel noise),
encode with the VAE, subtract the encoding of the empty background, and take the cosine similarity
of every pair of colours' object "templates". At high noise the position posterior of a diffusion
model is ∝ exp(<x_t, template(position)>), so when two colours' templates are anti-correlated
(cos < 0) the noise region that looks like "a white car" looks *unlike* "a red car", and the layout
flips with the colour word. In SD, objects share structure (edges, shading) across colours, the
templates correlate and the layout comes from the noise.

    python -m toyworld.diagnose [--vae models/toy/vae] [--grammar datasets/toy_world.yaml]
        [--style '{"outline_width": 2, "shading": 0.3}'] [--outline '{"park": [235, 235, 235]}']

prints, per background, the mean / minimum pairwise cosine over colours (car, and all shapes) and
the white–red cosine of the car (the README's example edit), plus the VAE's reconstruction error
on random renders of that world.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from itertools import combinations

import numpy as np
import torch

from toyworld.world import World, load_world


def encode(vae, images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → VAE posterior means (B, C, h, w)."""
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean


def object_templates(world: World, vae, shape: str, background: str, x0: int, y0: int, size: int) -> dict:
    """Per colour: flattened latent of the object minus the latent of the empty background."""
    clean = dataclasses.replace(world, noise_std=0.0)
    imgs = np.stack([clean.render(c, shape, background, seed=0, x0=x0, y0=y0, size=size).image
                     for c in world.colors])
    empty = np.broadcast_to(np.array(world.backgrounds[background]["rgb"], np.uint8),
                            imgs.shape[1:])[None]
    z = encode(vae, np.concatenate([imgs, empty]))
    return {c: (z[i] - z[-1]).flatten() for i, c in enumerate(world.colors)}


def pairwise_cosines(templates: dict) -> dict[tuple[str, str], float]:
    return {(a, b): float(torch.nn.functional.cosine_similarity(templates[a], templates[b], dim=0))
            for a, b in combinations(templates, 2)}


def template_correlation(world: World, vae, x0: int = 17, y0: int = 17, size: int = 30) -> dict:
    """Per background: {car_mean, car_min, white_red, all_mean, all_min} of the pairwise cosines."""
    out = {}
    for bg in world.backgrounds:
        per_shape = {s: pairwise_cosines(object_templates(world, vae, s, bg, x0, y0, size)) for s in world.shapes}
        everything = [v for cs in per_shape.values() for v in cs.values()]
        car = per_shape.get("car") or next(iter(per_shape.values()))
        out[bg] = {"car_mean": float(np.mean(list(car.values()))), "car_min": float(min(car.values())),
                   "white_red": car.get(("red", "white"), car.get(("white", "red"), float("nan"))),
                   "all_mean": float(np.mean(everything)), "all_min": float(min(everything))}
    return out


def reconstruction_mae(world: World, vae, n: int = 64, seed: int = 999) -> float:
    """Mean absolute reconstruction error (0..255) of the VAE on n random renders of the world."""
    imgs, _ = world.render_batch(np.random.default_rng(seed), n)
    x = torch.from_numpy(imgs).float().permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return float(((rec - x).abs() * 127.5).mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", default="models/toy/vae")
    ap.add_argument("--grammar", default=None)
    ap.add_argument("--style", default=None, help="JSON overriding the grammar's style: keys")
    ap.add_argument("--outline", default=None, help="JSON {background: [R, G, B]} outline colours")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import AutoencoderKL

    world = load_world(args.grammar)
    if args.style:
        world = dataclasses.replace(world, style={**world.style, **json.loads(args.style)})
    if args.outline:
        bgs = {k: dict(v) for k, v in world.backgrounds.items()}
        for k, rgb in json.loads(args.outline).items():
            bgs[k]["outline_rgb"] = tuple(rgb)
        world = dataclasses.replace(world, backgrounds=bgs)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    print(f"style {world.style}, outlines {{{', '.join(f'{k}: {world.outline_rgb(k)}' for k in world.backgrounds)}}}")
    for bg, r in template_correlation(world, vae).items():
        print(f"  {bg:7s} car mean {r['car_mean']:.2f} min {r['car_min']:.2f} white-red {r['white_red']:.2f} | "
              f"all shapes mean {r['all_mean']:.2f} min {r['all_min']:.2f}")
    print(f"  VAE reconstruction MAE on 64 renders: {reconstruction_mae(world, vae):.2f} / 255")


if __name__ == "__main__":
    main()
