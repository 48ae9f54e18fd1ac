"""The toy world: seeded, deterministic renders of one coloured shape on a simple background.

Everything (vocabulary, RGB values, backgrounds, sizes) is read from ``datasets/toy_world.yaml``.
Each render comes with its prompt ("a red circle", "an orange star in the park", ...) and exact
ground truth (colour, shape, background, boolean object mask).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf
from PIL import Image
from scipy import ndimage

from sdattn.errors import UserError
from sdattn.files import REPO_ROOT
from sdattn.text import article

DEFAULT_GRAMMAR = REPO_ROOT / "datasets" / "toy_world.yaml"
_TEMPLATE_RES = 192  # shapes are drawn once at this resolution, then box-filtered to size


# --------------------------------------------------------------------------- shape templates
def _shape_coverage(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test in normalised coordinates u, v in [-1, 1] (v points down)."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # pointing up, base at the bottom
        return (v <= 0.8) & (v >= -1.0) & (np.abs(u) <= (v + 1.0) / 1.8)
    if shape == "cross":  # a plus sign
        w = 0.34
        return ((np.abs(u) <= w) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= w) & (np.abs(u) <= 1.0))
    if shape == "star":  # five-pointed, one point up
        ang = np.arctan2(u, -v)  # 0 at the top, clockwise
        rad = np.sqrt(u**2 + v**2)
        k = 5
        r_out, r_in = 1.0, 0.42
        # polar boundary of a regular star polygon: interpolate between tip and notch radii
        # along straight edges (exact polygon edge in polar form).
        sector = 2 * np.pi / k
        a = np.mod(ang, sector)
        a = np.minimum(a, sector - a)  # 0 at a tip, sector/2 at a notch
        # edge from tip (r_out, 0) to notch (r_in, sector/2): line through the two points
        p1 = np.array([r_out, 0.0])
        p2 = np.array([r_in * np.cos(sector / 2), r_in * np.sin(sector / 2)])
        # line n.x = c
        n = np.array([p2[1] - p1[1], p1[0] - p2[0]])
        c = n @ p1
        denom = n[0] * np.cos(a) + n[1] * np.sin(a)
        r_edge = c / denom
        return rad <= r_edge
    if shape == "car":  # side view: body, cabin, two wheels (one silhouette, one colour)
        body = (np.abs(u) <= 1.0) & (v >= -0.1) & (v <= 0.42)
        cabin_half = 0.55 - 0.35 * (-(v + 0.1) / 0.45)  # trapezoid narrowing upwards
        cabin = (v >= -0.55) & (v < -0.1) & (np.abs(u + 0.05) <= cabin_half)
        wheels = ((u - 0.58) ** 2 + (v - 0.45) ** 2 <= 0.26**2) | ((u + 0.58) ** 2 + (v - 0.45) ** 2 <= 0.26**2)
        return body | cabin | wheels
    raise ValueError(f"no geometry for shape {shape!r}")


@functools.cache
def shape_template(shape: str) -> np.ndarray:
    """High-resolution 0/1 coverage of ``shape`` over the box [-1, 1]^2."""
    t = (np.arange(_TEMPLATE_RES) + 0.5) / _TEMPLATE_RES * 2 - 1
    v, u = np.meshgrid(t, t, indexing="ij")
    return _shape_coverage(shape, u, v).astype(np.float32)


@functools.lru_cache(maxsize=4096)
def coverage(shape: str, size: int) -> np.ndarray:
    """Anti-aliased coverage of ``shape`` in a size x size pixel box."""
    img = Image.fromarray(shape_template(shape), mode="F")
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32).clip(0, 1)


def outline_coverage(cov: np.ndarray, width: int) -> np.ndarray:
    """Anti-aliased coverage of the object dilated by ``width`` px (a disc), (H, W) in [0, 1]."""
    r = np.arange(-width, width + 1)
    disc = (r[:, None] ** 2 + r[None, :] ** 2) <= width**2 + width  # rounder than a square
    return ndimage.grey_dilation(cov, footprint=disc)


def texture_factor(n: int, amplitude: float, rng: np.random.Generator,
                   wavelength: tuple[float, float] = (6.0, 16.0)) -> np.ndarray:
    """(n, n) brightness factor 1 + amplitude · sin(stripes): orientation, wavelength (px) and phase drawn from
    ``rng``, so every image gets its own pattern while the object's mean colour stays its own."""
    theta, lam, phase = rng.uniform(0, np.pi), rng.uniform(*wavelength), rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return (1 + amplitude * np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / lam + phase)).astype(
        np.float32)


def shading_factor(n: int, y0: int, size: int, shading: float) -> np.ndarray:
    """(n, n) brightness factor: 1 at the object's top row, 1 - shading at its bottom row."""
    rows = ((np.arange(n, dtype=np.float32) - y0) / max(size - 1, 1)).clip(0, 1)
    return np.broadcast_to((1 - shading * rows)[:, None], (n, n))


# --------------------------------------------------------------------------- world / grammar
@dataclass
class Render:
    image: np.ndarray  # uint8 H x W x 3
    prompt: str
    color: str
    shape: str
    background: str
    mask: np.ndarray  # bool H x W, True on the object


@dataclass
class World:
    image_size: int
    noise_std: float
    margin: int
    size_range: tuple[int, int]
    colors: dict[str, tuple[int, int, int]]
    shapes: list[str]
    backgrounds: dict[str, dict]
    background_probs: dict[str, float]
    articles: list[str] = field(default_factory=lambda: ["a", "an"])
    style: dict = field(default_factory=dict)  # colour-independent object structure (see the YAML's style:)

    # ---- style (outline ring, vertical shading); all 0 = plain flat objects
    @property
    def outline_width(self) -> int:
        return int(self.style.get("outline_width", 0))

    @property
    def shading(self) -> float:
        return float(self.style.get("shading", 0.0))

    @property
    def texture(self) -> float:
        """Amplitude of the per-image stripe texture on the object (0 = none)."""
        return float(self.style.get("texture", 0.0))

    @property
    def background_jitter(self) -> float:
        """Per-image uniform offset of the background's RGB, ± this many levels (0 = none)."""
        return float(self.style.get("background_jitter", 0.0))

    def __post_init__(self) -> None:
        if self.outline_width > 0:  # every background needs an outline colour: an error now, not mid-render
            for b in self.backgrounds:
                self.outline_rgb(b)

    def outline_rgb(self, background: str) -> tuple[int, int, int]:
        """The outline's colour on ``background`` (its own ``outline_rgb``, else the style's)."""
        rgb = self.backgrounds[background].get("outline_rgb") or self.style.get("outline_rgb")
        if rgb is None:
            raise UserError(f"toy world: style.outline_rgb is not set and background {background!r} has no "
                            f"outline_rgb, but style.outline_width is {self.outline_width}; set style.outline_rgb: "
                            "[R, G, B] (or outline_width: 0 for flat objects)")
        return tuple(rgb)

    # ---- vocabulary and prompts
    @property
    def background_words(self) -> list[str]:
        words: list[str] = []
        for b in self.backgrounds.values():
            for w in b["phrase"].split():
                if w not in words:
                    words.append(w)
        return words

    def vocabulary(self) -> list[str]:
        """Every word a prompt may use (each is one token of the toy tokenizer)."""
        return list(self.articles) + list(self.colors) + list(self.shapes) + self.background_words

    def make_prompt(self, color: str, shape: str, background: str = "none") -> str:
        phrase = self.backgrounds[background]["phrase"]
        prompt = f"{article(color)} {color} {shape}"
        return f"{prompt} {phrase}" if phrase else prompt

    def check_prompt(self, prompt: str) -> list[str]:
        """Return the prompt's words; raise ValueError (listing the vocabulary) on an unknown word."""
        words = re.findall(r"[A-Za-z]+|[^\sA-Za-z]", prompt.lower())
        vocab = self.vocabulary()
        unknown = [w for w in words if w not in vocab]
        if unknown:
            raise ValueError(
                f"prompt {prompt!r} has words outside the toy-world vocabulary: {unknown}. "
                f"Vocabulary: {', '.join(vocab)}"
            )
        return words

    def parse_prompt(self, prompt: str) -> dict:
        """(color, shape, background) named by a prompt; None for a part it does not name."""
        words = self.check_prompt(prompt)
        color = next((w for w in words if w in self.colors), None)
        shape = next((w for w in words if w in self.shapes), None)
        text = " ".join(words)
        background = "none"
        for name, b in self.backgrounds.items():
            if b["phrase"] and b["phrase"] in text:
                background = name
        return {"color": color, "shape": shape, "background": background}

    # ---- rendering
    def sample_spec(self, rng: np.random.Generator) -> dict:
        color = str(rng.choice(list(self.colors)))
        shape = str(rng.choice(self.shapes))
        names = list(self.background_probs)
        p = np.array([self.background_probs[n] for n in names], dtype=float)
        background = str(rng.choice(names, p=p / p.sum()))
        return {"color": color, "shape": shape, "background": background, **self._sample_place(rng)}

    def _sample_place(self, rng: np.random.Generator) -> dict:
        lo, hi = self.size_range
        r = int(rng.integers(lo, hi + 1))
        size = 2 * r
        margin = self.margin + self.outline_width  # the outline ring keeps off the border too
        x0 = int(rng.integers(margin, self.image_size - margin - size + 1))
        y0 = int(rng.integers(margin, self.image_size - margin - size + 1))
        return {"x0": x0, "y0": y0, "size": size}

    def render(self, color: str, shape: str, background: str = "none", *, seed: int | None = None,
               rng: np.random.Generator | None = None, x0: int | None = None, y0: int | None = None,
               size: int | None = None) -> Render:
        """Render one object; placement is drawn from ``rng``/``seed`` unless given."""
        if color not in self.colors:
            raise ValueError(f"unknown colour {color!r}; colours: {', '.join(self.colors)}")
        if shape not in self.shapes:
            raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(self.shapes)}")
        if background not in self.backgrounds:
            raise ValueError(f"unknown background {background!r}; backgrounds: {', '.join(self.backgrounds)}")
        rng = rng if rng is not None else np.random.default_rng(seed)
        if x0 is None or y0 is None or size is None:
            place = self._sample_place(rng)
            x0 = place["x0"] if x0 is None else x0
            y0 = place["y0"] if y0 is None else y0
            size = place["size"] if size is None else size
        n = self.image_size
        cov = np.zeros((n, n), np.float32)
        cov[y0:y0 + size, x0:x0 + size] = coverage(shape, int(size))[: n - y0, : n - x0]
        bg = np.array(self.backgrounds[background]["rgb"], np.float32)
        if self.background_jitter:  # drawn only when set: the plain world's renders stay as they were
            bg = np.clip(bg + rng.uniform(-self.background_jitter, self.background_jitter, 3), 0, 255).astype(
                np.float32)
        fg = np.array(self.colors[color], np.float32)
        img = np.broadcast_to(bg, (n, n, 3)).astype(np.float32)
        if self.outline_width:
            ring = outline_coverage(cov, self.outline_width)
            img = img * (1 - ring[..., None]) + np.array(self.outline_rgb(background), np.float32) * ring[..., None]
        fg_img = fg * shading_factor(n, y0, size, self.shading)[..., None]  # (n, n, 3)
        if self.texture:
            fg_img = fg_img * texture_factor(n, self.texture, rng)[..., None]
        img = img * (1 - cov[..., None]) + fg_img * cov[..., None]
        img = img + rng.normal(0.0, self.noise_std, img.shape).astype(np.float32)
        image = np.clip(np.round(img), 0, 255).astype(np.uint8)
        return Render(image=image, prompt=self.make_prompt(color, shape, background), color=color,
                      shape=shape, background=background, mask=cov >= 0.5)

    def render_random(self, seed: int | None = None, rng: np.random.Generator | None = None) -> Render:
        rng = rng if rng is not None else np.random.default_rng(seed)
        spec = self.sample_spec(rng)
        return self.render(spec["color"], spec["shape"], spec["background"], rng=rng,
                           x0=spec["x0"], y0=spec["y0"], size=spec["size"])

    def render_batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        """n random renders: uint8 array (n, H, W, 3) and their prompts."""
        items = [self.render_random(rng=rng) for _ in range(n)]
        return np.stack([r.image for r in items]), [r.prompt for r in items]


def load_world(path: str | Path | None = None) -> World:
    """Read the grammar YAML (default ``datasets/toy_world.yaml``)."""
    return _load_world(str(Path(path) if path else DEFAULT_GRAMMAR))


def read_grammar(path: str | Path) -> dict:
    """A grammar YAML as a dict; one with ``extends: <file>`` (relative to its own folder) is that grammar with
    this file's keys merged over it (nested keys such as ``style:`` one by one), so a variant names only what
    it changes."""
    cfg = yaml.safe_load(Path(path).read_text())
    base = cfg.pop("extends", None)
    if base is None:
        return cfg
    return OmegaConf.to_container(OmegaConf.merge(read_grammar(Path(path).parent / base), cfg))


@functools.lru_cache(maxsize=8)
def _load_world(path: str) -> World:
    cfg = read_grammar(path)
    return World(
        image_size=int(cfg["image_size"]),
        noise_std=float(cfg["noise_std"]),
        margin=int(cfg["margin"]),
        size_range=tuple(cfg["size_range"]),
        colors={k: tuple(int(c) for c in v) for k, v in cfg["colors"].items()},
        shapes=list(cfg["shapes"]),
        backgrounds={k: {"phrase": v.get("phrase", "") or "", "rgb": tuple(v["rgb"]),
                         "outline_rgb": tuple(v["outline_rgb"]) if v.get("outline_rgb") else None}
                     for k, v in cfg["backgrounds"].items()},
        background_probs={k: float(v) for k, v in cfg["background_probs"].items()},
        articles=list(cfg.get("articles", ["a", "an"])),
        style=dict(cfg.get("style") or {}),
    )

