"""Layer identity and selection for the attention layers of a diffusers UNet.

Layers are numbered 1..N in run order *within their kind* (self = ``attn1``, cross = ``attn2``):
down blocks, then the mid block, then the up blocks; inside a block by attention module and then
transformer block. ``unet.attn_processors`` lists the mid block last, so the order is built from
the processor names and the UNet's block structure, never from call counts.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import UserError

Kind = Literal["self", "cross"]
KINDS: tuple[str, ...] = ("self", "cross")

_NAME = re.compile(
    r"^(?P<stage>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?"
    r"\.attentions\.(?P<attn>\d+)\.transformer_blocks\.(?P<tb>\d+)\.(?P<which>attn\d+)\.processor$"
)
_STAGE_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


@dataclass(frozen=True)
class LayerId:
    """One attention layer: its place in run order and where it lives in the UNet."""

    index: int  # 1-based, run order within its kind
    kind: Kind  # "self" (attn1) or "cross" (attn2)
    block: str  # "down.0", "mid", "up.2"
    height: int  # spatial size of its query tokens (latent pixels) at the configured image size
    width: int
    name: str  # diffusers processor name, key of ``unet.attn_processors``

    @property
    def resolution(self) -> int:
        """Side length of the query grid (the height for non-square images)."""
        return self.height

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.index}"

    @property
    def module_name(self) -> str:
        return self.name.removesuffix(".processor")


def _block_sizes(unet, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Query-grid size of every block, walking the UNet's down/up-samplers in run order."""
    h, w = latent_hw
    sizes: dict[str, tuple[int, int]] = {}
    for i, block in enumerate(unet.down_blocks):
        sizes[f"down_blocks.{i}"] = (h, w)
        if getattr(block, "downsamplers", None):
            h, w = (h + 1) // 2, (w + 1) // 2
    sizes["mid_block"] = (h, w)
    for i, block in enumerate(unet.up_blocks):
        sizes[f"up_blocks.{i}"] = (h, w)
        if getattr(block, "upsamplers", None):
            h, w = h * 2, w * 2
    return sizes


def enumerate_layers(unet, latent_hw: tuple[int, int] | None = None) -> list[LayerId]:
    """All attention layers of ``unet`` in run order (self layers first, then cross layers).

    ``latent_hw`` is the latent size the UNet will see; default ``unet.config.sample_size``.
    """
    if latent_hw is None:
        s = unet.config.sample_size
        latent_hw = (s, s) if isinstance(s, int) else tuple(s)
    sizes = _block_sizes(unet, latent_hw)
    parsed = []
    for name in unet.attn_processors:
        m = _NAME.match(name)
        if m is None:
            raise UserError(f"unsupported attention layer {name!r}: expected SD-1.x-style transformer blocks")
        block_key = m["stage"] if m["block"] is None else f"{m['stage']}.{m['block']}"
        module = unet.get_submodule(name.removesuffix(".processor"))
        kind = "cross" if module.is_cross_attention else "self"
        order = (_STAGE_ORDER[m["stage"]], int(m["block"] or 0), int(m["attn"]), int(m["tb"]), m["which"])
        parsed.append((order, kind, block_key, name))
    parsed.sort()
    layers: list[LayerId] = []
    for kind in KINDS:
        mine = [p for p in parsed if p[1] == kind]
        for i, (_, _, block_key, name) in enumerate(mine, start=1):
            short = block_key.replace("_blocks", "").replace("mid_block", "mid")
            h, w = sizes[block_key]
            layers.append(LayerId(i, kind, short, h, w, name))
    return layers


def parse_indices(spec, n: int) -> list[int]:
    """``"4-14"``, ``"3,6,9"``, ``[3, 6]``, ``7`` or ``"all"`` → sorted 1-based indices in 1..n."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(1, n + 1))
    items = [spec] if isinstance(spec, int) else spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", text)
        if m is None:
            raise UserError(f"layer spec {text!r} is not an index or a range like 4-14 (or 'all')")
        lo, hi = (int(m[1]), int(m[2])) if m[3] is None else (int(m[3]), int(m[3]))
        if lo > hi:
            raise UserError(f"layer range {text!r} is empty: write it as low-high")
        for i in (lo, hi):
            if not 1 <= i <= n:
                raise UserError(f"layer index {i} is out of range: this model has layers 1..{n}")
        out.update(range(lo, hi + 1))
    return sorted(out)


@dataclass
class LayerSelector:
    """Which layers to hook, from config. Every given criterion must hold (AND).

    kinds: "self" / "cross" (or a list); indices: see :func:`parse_indices` (per kind);
    resolutions: query-grid sides to keep; max_tokens: keep layers with ≤ this many query tokens;
    names: fnmatch patterns on the diffusers processor name.
    """

    kinds: Sequence[str] | str | None = None
    indices: object = None
    resolutions: Sequence[int] | None = None
    max_tokens: int | None = None
    names: Sequence[str] | None = None

    def select(self, layers: Sequence[LayerId]) -> list[LayerId]:
        kinds = [self.kinds] if isinstance(self.kinds, str) else list(self.kinds or KINDS)
        for k in kinds:
            if k not in KINDS:
                raise UserError(f"layer kind {k!r} is not one of {list(KINDS)}")
        chosen: list[LayerId] = []
        for kind in kinds:
            mine = [layer for layer in layers if layer.kind == kind]
            wanted = set(parse_indices(self.indices, len(mine)))
            for layer in mine:
                if layer.index not in wanted:
                    continue
                if self.resolutions is not None and layer.resolution not in set(self.resolutions):
                    continue
                if self.max_tokens is not None and layer.tokens > self.max_tokens:
                    continue
                if self.names is not None and not any(fnmatch.fnmatch(layer.name, p) for p in self.names):
                    continue
                chosen.append(layer)
        return chosen


PRESETS = ("all", "none", "paper", "official", "stable", "decoder")
_ATTENTION = re.compile(r"\.attentions\.(\d+)\.")


def _relative_side(spec, largest: int) -> int | None:
    """A query-grid side: an int, ``"1/k"`` (the largest grid's side ÷ k) or null/``"all"`` (any) → int or None."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    text = str(spec).strip()
    if not isinstance(spec, bool) and text.isdigit() and int(text) > 0:
        return int(text)
    if text.startswith("1/") and text[2:].isdigit() and int(text[2:]) > 0:
        return max(1, largest // int(text[2:]))
    raise UserError(f"resolution {spec!r} is not a grid side (e.g. 16), a fraction of the largest grid's side "
                    "like '1/4', or 'all'")


def select_layers(layers: Sequence[LayerId], spec="all", kind: str = "self", resolution=None) -> list[LayerId]:
    """The layers of ``kind`` that ``spec`` names: the one layer-preset function of every method and observer.

    ``spec``: ``"all"``; ``"none"``/null/[] (no layer); indices ``"4-14"``, ``"3,6"``, ``[3, 6]``, ``7``;
    or a preset, each relative to the largest query grid (the latent's on SD-1.x):

    - ``"paper"``: layers 4–14 (Liu et al. §4; needs ≥ 14 layers of the kind);
    - ``"official"``: query grids of ≤ 1/4 of the largest's tokens (FPE's official ``tokens ≤ 32²`` at
      512 px: SD 1.5 layers 3–13);
    - ``"stable"``: ≤ 1/16 of its tokens (prompt-to-prompt_stable.ipynb's ≤ 16² at 512 px: SD 5–10);
    - ``"decoder"``: the up blocks' layers except those of the first attention module of the first up
      block with attention (PnP's official ``{1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}``: SD 9–16).

    ``resolution``: also keep only layers whose query grid has this side: an int, ``"1/k"`` (the largest
    grid's side ÷ k) or null/``"all"``.
    """
    if kind not in KINDS:
        raise UserError(f"layer kind {kind!r} is not one of {list(KINDS)}")
    mine = [x for x in layers if x.kind == kind]
    if not mine:
        return []
    largest = max(mine, key=lambda x: x.tokens)
    side = _relative_side(resolution, largest.height)
    sides = None if side is None else [side]  # LayerSelector's resolutions
    if spec is None or spec == "none" or (not isinstance(spec, (str, int)) and len(spec) == 0):
        return []
    if spec == "paper":
        if len(mine) < 14:
            raise UserError(f"layer preset 'paper' (4-14) needs ≥ 14 {kind} layers; this model has {len(mine)}")
        return LayerSelector(kinds=kind, indices="4-14", resolutions=sides).select(layers)
    if spec in ("official", "stable"):
        divisor = 4 if spec == "official" else 16
        return LayerSelector(kinds=kind, max_tokens=largest.tokens // divisor, resolutions=sides).select(layers)
    if spec == "decoder":
        up = [x for x in mine if x.block.startswith("up.")]
        first = f"up.{min(int(x.block[3:]) for x in up)}" if up else None
        return [x for x in up if (side is None or x.resolution == side)
                and not (x.block == first and _ATTENTION.search(x.name)[1] == "0")]
    return LayerSelector(kinds=kind, indices=spec, resolutions=sides).select(layers)


def format_layer_table(layers: Sequence[LayerId]) -> str:
    """A plain-text table of the layers, one line each."""
    rows = [f"{'kind':<6}{'index':>6}  {'block':<8}{'res':>8}  name"]
    rows += [f"{x.kind:<6}{x.index:>6}  {x.block:<8}{f'{x.height}x{x.width}':>8}  {x.name}" for x in layers]
    return "\n".join(rows)
