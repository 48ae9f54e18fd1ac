"""Check toy-model samples against the toy world's ground truth by pixel analysis.

``classify_image(img) -> (color, shape, mask)``:
  * background colour = median of the image border (objects never touch the border),
  * foreground mask = pixels farther than half the robust maximum distance from it (so the edge
    sits at 50 % coverage, like the renderer's mask), largest connected component, holes filled,
  * colour = mean colour of the (eroded) mask -> nearest named colour of the grammar,
  * shape = nearest shape template by IoU after normalising the mask's box (aspect kept).

``evaluate(...)`` (the ``eval_toy`` task) samples prompts with fixed seeds, classifies every
image and writes ``metrics.json`` (``color_accuracy``, ``shape_accuracy``, ``per_class``, ...).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sdattn.sampling import sample
from toyworld.model import load_pipeline
from toyworld.world import World, coverage, load_world, outline_coverage, shape_template

NORM = 32  # normalised mask resolution for shape matching
MIN_PIXELS = 20  # smaller foregrounds count as "no object found"


# --------------------------------------------------------------------------- image helpers
def to_uint8(img) -> np.ndarray:
    """Accept uint8 HxWx3, float HxWx3 / 3xHxW in [0, 1] (or [-1, 1]), PIL images, tensors."""
    if hasattr(img, "convert"):  # PIL
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu().numpy()
    a = np.asarray(img)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float32)
    if a.min() < -0.01:
        a = (a + 1) / 2
    if a.max() <= 1.0 + 1e-3:
        a = a * 255
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _normalise_mask(mask: np.ndarray) -> np.ndarray:
    """Crop to the mask's box, pad to a square (aspect kept), resize to NORM x NORM (float)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    h, w = crop.shape
    s = max(h, w)
    sq = np.zeros((s, s), np.float32)
    sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = crop
    t = torch.from_numpy(sq)[None, None]
    return torch.nn.functional.interpolate(t, size=(NORM, NORM), mode="area")[0, 0].numpy()


@functools.cache
def _templates(shapes: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for s in shapes:
        hi = shape_template(s) >= 0.5
        out[s] = _normalise_mask(hi)
    return out


BLURS = (0.0, 1.0, 1.6, 2.2)  # px: templates also as a decoder would soften them (rounded tips)


@functools.lru_cache(maxsize=2048)
def _sized_templates(shapes: tuple[str, ...], size: int, outline: int = 0) -> dict[str, list[np.ndarray]]:
    """Per shape: normalised masks of the shape drawn at ``size`` px (with its ``outline`` px ring when
    the world draws one), sharp and Gaussian-softened."""
    out: dict[str, list[np.ndarray]] = {}
    for s in shapes:
        cov = np.pad(coverage(s, max(size - 2 * outline, 4)), 4 + outline)
        if outline:
            cov = outline_coverage(cov, outline)
        out[s] = []
        for sigma in BLURS:
            m = (ndimage.gaussian_filter(cov, sigma) if sigma else cov) >= 0.5
            if m.sum() >= 4:
                out[s].append(_normalise_mask(m))
    return out


def classify_mask_shape(mask: np.ndarray, world: World | None = None,
                        outline: int = 0) -> tuple[str, dict[str, float]]:
    """Nearest shape template by soft IoU of the normalised mask; returns (shape, scores).

    Templates are drawn at the mask's own size, sharp and softened (a decoder rounds thin tips),
    and a shape scores its best variant. ``outline`` > 0: the mask is object + outline ring, and so
    are the templates.
    """
    world = world or load_world()
    m = _normalise_mask(mask)
    ys, xs = np.nonzero(mask)
    size = int(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
    scores = {}
    for s, ts in _sized_templates(tuple(world.shapes), max(size, 6), outline).items():
        scores[s] = max(float(np.minimum(m, t).sum() / max(np.maximum(m, t).sum(), 1e-6)) for t in ts)
    return max(scores, key=scores.get), scores


def foreground_mask(img: np.ndarray, enclosed: bool = False, close: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(bool mask of the main object, background RGB) of a uint8 HxWx3 image. ``enclosed``: the
    object sits inside a ring (an outline), so holes are filled before the largest part is kept
    (an object close to the background colour is then joined to its ring). ``close`` > 0: gaps in the
    ring up to about twice that many pixels are closed first (a morphological closing with a disc)."""
    a = img.astype(np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(a - bg, axis=-1)
    border_d = np.linalg.norm(border - bg, axis=-1)
    noise = float(np.percentile(border_d, 95))
    peak = float(np.percentile(dist, 99.5))
    thr = max(0.5 * peak, 2.0 * noise, 20.0)
    mask = dist > thr
    if close:
        mask = ndimage.binary_closing(np.pad(mask, close + 1), structure=_disc(close))[close + 1:-close - 1,
                                                                                     close + 1:-close - 1]
    if enclosed:
        mask = ndimage.binary_fill_holes(mask)
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool), bg
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    mask = lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask), bg


def _disc(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2 + radius  # the renderer's outline disc


def _inside_ring(mask: np.ndarray, w: int) -> np.ndarray:
    """The object inside a foreground of object + ring: ``mask`` eroded by the outline's disc (radius ``w``)."""
    return ndimage.binary_erosion(np.pad(mask, w + 1), structure=_disc(w))[w + 1:-w - 1, w + 1:-w - 1]


def classify_image(img, world: World | None = None) -> tuple[str | None, str | None, np.ndarray]:
    """(colour name, shape name, bool mask) of a toy-world image; (None, None, mask) if no object.

    In a world with outlines (``style.outline_width`` w > 0) the foreground is object + ring: its shape
    is matched against outlined templates, the object mask is the foreground eroded by the outline's
    disc, and the colour is the mean of the pixels deeper than w + 1.5 px inside the foreground
    (the object's interior, away from the ring; the deepest pixels for thin objects). A generated ring
    can have a gap; an object close to the background colour (white on the light ground) then leaks
    out and the foreground is the ring alone, with (almost) nothing inside: when the ring closed by a
    disc of w + 1 px holds more than twice as much, the closed foreground is read instead.
    """
    world = world or load_world()
    a = to_uint8(img)
    w = world.outline_width
    mask, _bg = foreground_mask(a, enclosed=bool(w))
    if w:  # a ring with a gap holds (almost) nothing inside; closed, it holds the object
        inside = _inside_ring(mask, w)
        closed, _bg = foreground_mask(a, enclosed=True, close=w + 1)
        closed_inside = _inside_ring(closed, w)
        if closed_inside.sum() > 2 * inside.sum():
            mask, inside = closed, closed_inside
    if mask.sum() < MIN_PIXELS:
        return None, None, mask
    if w:
        depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        sel = depth >= w + 1.5
        if sel.sum() < MIN_PIXELS // 2:
            sel = depth >= np.sort(depth[mask])[-min(MIN_PIXELS // 2, int(mask.sum()))]
        shape, _ = classify_mask_shape(mask, world, outline=w)
        return _nearest_color(a[sel], world), shape, inside
    inner = ndimage.binary_erosion(mask, iterations=1)
    sel = inner if inner.sum() >= MIN_PIXELS // 2 else mask
    shape, _ = classify_mask_shape(mask, world)
    return _nearest_color(a[sel], world), shape, mask


def _nearest_color(pixels: np.ndarray, world: World) -> str:
    """The grammar's colour nearest to the mean of ``pixels`` (N, 3)."""
    mean = pixels.astype(np.float32).mean(axis=0)
    names = list(world.colors)
    rgb = np.array([world.colors[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(rgb - mean, axis=1)))]


def validate_checker(n: int = 350, seed: int = 123, world: World | None = None) -> dict:
    """Accuracy of classify_image on real renders (should be ~100 %), and mask IoU."""
    world = world or load_world()
    rng = np.random.default_rng(seed)
    c_ok = s_ok = 0
    ious = []
    for _ in range(n):
        r = world.render_random(rng=rng)
        c, s, m = classify_image(r.image, world)
        c_ok += c == r.color
        s_ok += s == r.shape
        ious.append((m & r.mask).sum() / max((m | r.mask).sum(), 1))
    return {"n": n, "color_accuracy": c_ok / n, "shape_accuracy": s_ok / n, "mask_iou": float(np.mean(ious))}


# --------------------------------------------------------------------------- sampling
def sample_images(pipe, prompts, seeds, num_inference_steps=25, guidance_scale=2.0) -> np.ndarray:
    """uint8 images (B, H, W, 3) for prompts/seeds through the project's sampler."""
    out = sample(pipe, list(prompts), list(seeds), num_inference_steps=num_inference_steps,
                 guidance_scale=guidance_scale, progress=False)
    return np.stack([to_uint8(im) for im in out.images])


# --------------------------------------------------------------------------- evaluation
def eval_prompts(world: World, per_combo: int = 2) -> list[tuple[str, str, str]]:
    """Every colour x shape, ``per_combo`` times, backgrounds cycling."""
    bgs = list(world.backgrounds)
    items, k = [], 0
    for _rep in range(per_combo):
        for c in world.colors:
            for s in world.shapes:
                items.append((c, s, bgs[k % len(bgs)]))
                k += 1
        k += 1  # shift the background cycle between repetitions
    return items


def _save_grid(images: np.ndarray, path: Path, cols: int = 14) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).save(path)


def evaluate(model_dir: str | Path, out_dir: str | Path | None, per_combo: int, num_inference_steps: int,
             guidance_scale: float | None, seed: int, batch: int, threads: int | None, grammar=None,
             validate: bool = True) -> dict:
    """Sample per_combo x |colours| x |shapes| prompts and score them; writes metrics.json. The settings
    and their defaults: ``eval:`` of configs/experiment/eval_toy.yaml (``experiment=eval_toy``)."""
    if threads:
        torch.set_num_threads(int(threads))
    world = load_world(grammar)
    pipe = load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    meta_path = Path(pipe.config._name_or_path if hasattr(pipe.config, "_name_or_path") else model_dir)
    meta = {}
    for cand in (Path(str(model_dir)), meta_path):
        if (cand / "toy_model.json").exists():
            meta = json.loads((cand / "toy_model.json").read_text())
            break
    if guidance_scale is None:
        guidance_scale = float(meta.get("guidance_scale", 2.0))
    items = eval_prompts(world, per_combo)
    prompts = [world.make_prompt(c, s, b) for c, s, b in items]
    seeds = [seed + i for i in range(len(items))]
    t0 = time.time()
    images = []
    for i in range(0, len(items), batch):
        images.append(sample_images(pipe, prompts[i:i + batch], seeds[i:i + batch], num_inference_steps,
                                    guidance_scale))
    images = np.concatenate(images)
    t_sample = time.time() - t0
    rows = []
    for (c, s, b), p, sd, im in zip(items, prompts, seeds, images):
        pc, ps, m = classify_image(im, world)
        rows.append({"prompt": p, "seed": sd, "color": c, "shape": s, "background": b, "pred_color": pc,
                     "pred_shape": ps, "found": pc is not None, "mask_pixels": int(m.sum())})

    def acc(sel, key):
        return float(np.mean([r[f"pred_{key}"] == r[key] for r in sel])) if sel else float("nan")

    per_class = {
        "color": {c: acc([r for r in rows if r["color"] == c], "color") for c in world.colors},
        "shape": {s: acc([r for r in rows if r["shape"] == s], "shape") for s in world.shapes},
        "background": {b: {"color": acc([r for r in rows if r["background"] == b], "color"),
                           "shape": acc([r for r in rows if r["background"] == b], "shape")}
                       for b in world.backgrounds},
    }
    metrics = {
        "color_accuracy": acc(rows, "color"),
        "shape_accuracy": acc(rows, "shape"),
        "both_accuracy": float(np.mean([r["pred_color"] == r["color"] and r["pred_shape"] == r["shape"]
                                        for r in rows])),
        "found_rate": float(np.mean([r["found"] for r in rows])),
        "per_class": per_class,
        "n": len(rows),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "model_dir": str(model_dir),
        "sample_seconds": round(t_sample, 1),
    }
    if validate:
        metrics["checker_on_renders"] = validate_checker(world=world)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        _save_grid(images, out / "samples.png")
    return metrics
