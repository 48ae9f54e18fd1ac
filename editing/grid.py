"""Labelled image grids (captions drawn on the image) and tensor ↔ PIL helpers."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] → PIL RGB."""
    if image.dim() == 4:
        image = image[0]
    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def labelled_grid(rows: Sequence[Sequence[tuple[torch.Tensor | Image.Image, str]]], cell: int = 256,
                  row_labels: Sequence[str] | None = None) -> Image.Image:
    """rows of (image, caption) → one PIL image; each cell resized to ``cell`` px with its caption
    under it, and an optional label at the left of each row."""
    font = ImageFont.load_default()
    cap_h, label_w = 18, (120 if row_labels else 0)
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + n_cols * cell, len(rows) * (cell + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = i * (cell + cap_h)
        if row_labels:
            draw.text((4, y + cell // 2), str(row_labels[i]), fill="black", font=font)
        for j, (img, caption) in enumerate(row):
            pil = img if isinstance(img, Image.Image) else to_pil(img)
            x = label_w + j * cell
            grid.paste(pil.resize((cell, cell), Image.NEAREST if pil.width < cell else Image.LANCZOS), (x, y))
            draw.text((x + 4, y + cell + 2), caption[: cell // 6], fill="black", font=font)
    return grid


def font_for(cell: int) -> ImageFont.ImageFont:
    """PIL's default font at about 1/18 of ``cell`` (Pillow ≥ 10.1 scales it; older ones: its bitmap size)."""
    try:
        return ImageFont.load_default(size=max(cell // 18, 10))
    except (TypeError, OSError):
        return ImageFont.load_default()


def text_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: Sequence[str], width: int, font) -> None:
    """``lines`` drawn from ``xy`` down, each wrapped to ``width`` px (by its average glyph width)."""
    glyph = max(draw.textlength("abcdefghij", font=font) / 10, 1)
    line_h = int(font.getbbox("Ag")[3]) + 3
    x, y = xy
    for line in lines:
        for part in textwrap.wrap(line, max(int((width - 8) / glyph), 4)) or [""]:
            draw.text((x, y), part, fill="black", font=font)
            y += line_h


def comparison_grid(source: torch.Tensor, source_caption: str, target_prompt: str,
                    columns: Sequence[tuple[str, torch.Tensor, Sequence[str]]], cell: int = 256,
                    footer: str = "") -> Image.Image:
    """One row in the layout of the paper's Fig. 8: the source image, the target prompt, then one column
    per method (name, edited image (1, 3, H, W) in [0, 1], text lines printed under it: time, scores);
    ``footer`` under the source column (e.g. how the times were taken)."""
    font = font_for(cell)
    line_h = int(font.getbbox("Ag")[3]) + 3
    cells = [(source, ["source", source_caption, footer]), (None, [])]
    cells += [(image, [name, *lines]) for name, image, lines in columns]
    n_lines = max(len(lines) for _, lines in cells) + 1  # room for a wrapped line
    grid = Image.new("RGB", (len(cells) * cell, cell + n_lines * line_h + 4), "white")
    draw = ImageDraw.Draw(grid)
    for j, (img, lines) in enumerate(cells):
        if img is None:  # the target prompt, as the paper prints it beside the source
            text_lines(draw, (j * cell + 4, cell // 3), [target_prompt], cell, font_for(2 * cell))
            continue
        pil = img if isinstance(img, Image.Image) else to_pil(img)
        grid.paste(pil.resize((cell, cell), Image.NEAREST if pil.width < cell else Image.LANCZOS), (j * cell, 0))
        text_lines(draw, (j * cell + 4, cell + 2), [x for x in lines if x], cell, font)
    return grid
