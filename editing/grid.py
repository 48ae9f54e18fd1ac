"""Labelled image grids (captions drawn on the image) and tensor ↔ PIL helpers."""

from __future__ import annotations

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
