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


def text_cell(text: str, size: int) -> Image.Image:
    """A white ``size`` px square with ``text`` wrapped on it (a prompt shown as a grid column)."""
    font = ImageFont.load_default()
    cell = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(cell)
    per_line = max(size // 6 - 1, 4)
    lines = textwrap.wrap(text, per_line) or [""]
    y = max((size - 14 * len(lines)) // 2, 2)
    for line in lines:
        draw.text((4, y), line, fill="black", font=font)
        y += 14
    return cell


def comparison_grid(source: torch.Tensor, source_caption: str, target_prompt: str,
                    columns: Sequence[tuple[str, torch.Tensor, Sequence[str]]], cell: int = 256) -> Image.Image:
    """One row in the layout of the paper's Fig. 8: the source image, the target prompt, then one column
    per method (name, edited image (1, 3, H, W) in [0, 1], text lines printed under it: time, scores)."""
    font = ImageFont.load_default()
    line_h = 14
    n_lines = 1 + max((len(lines) for _, _, lines in columns), default=0)
    cells = [(source, ["source", source_caption]), (text_cell(target_prompt, cell), ["target prompt"])]
    cells += [(image, [name, *lines]) for name, image, lines in columns]
    grid = Image.new("RGB", (len(cells) * cell, cell + (n_lines + 1) * line_h + 4), "white")
    draw = ImageDraw.Draw(grid)
    for j, (img, lines) in enumerate(cells):
        pil = img if isinstance(img, Image.Image) else to_pil(img)
        grid.paste(pil.resize((cell, cell), Image.NEAREST if pil.width < cell else Image.LANCZOS), (j * cell, 0))
        for k, line in enumerate(lines):
            draw.text((j * cell + 4, cell + 2 + k * line_h), line[: cell // 6], fill="black", font=font)
    return grid
