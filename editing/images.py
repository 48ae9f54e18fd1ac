"""Real images into the model's pixel space: read any image PIL opens correctly as RGB, fit it to the
model's size.

Reading: EXIF orientation applied; first frame of multi-frame files; 16-bit (``I;16*``, ``I``) scaled
from their full range (``convert("RGB")`` would clip them to white); palette, CMYK, YCbCr, LAB, HSV
converted; transparency composited on white. Float (``F``) and other modes are refused with one line.

Fitting (``resize``), each as one official code does it:
- ``squash`` (default) — resized to the model's size whatever the aspect ratio with PIL's bicubic
  (``Image.resize((512, 512))``, as P2P's and FPE's null-text notebooks resize after their crop);
- ``squash_nearest`` — the same squash with ``torch.nn.functional.interpolate``'s default nearest
  neighbour on the image tensor: exactly FPE's ``edit_real.ipynb`` and MasaCtrl's ``load_image``
  (aliases when a large photo is shrunk, hence not the default);
- ``crop`` — centre-cropped to the model's aspect ratio, then PIL bicubic: P2P's ``load_512``
  (square crop, ``Image.resize((512, 512))``);
- ``squash_lanczos`` — the squash with PIL's LANCZOS: pix2pix-zero's ``src/inversion.py``
  (``Image.open(p).resize((512, 512), Image.Resampling.LANCZOS)``) and Shape-Guided's ``preprocess_image``.
All accept any size (smaller images are upsampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdattn.errors import UserError

RESIZE_MODES = ("squash", "squash_nearest", "crop", "squash_lanczos")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
DIRECT = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV")  # PIL converts these to RGB exactly
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class ImageFit:
    """What fitting did to one image: its original size and whether it was resized / upsampled."""

    original: tuple[int, int]  # (width, height)
    size: tuple[int, int]  # (width, height) given to the model
    resize: str

    @property
    def resized(self) -> bool:
        return self.original != self.size

    @property
    def upsampled(self) -> bool:
        return self.original[0] < self.size[0] or self.original[1] < self.size[1]


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    full = 65535.0 if img.mode in SIXTEEN_BIT or a.max(initial=0) > 255 else 255.0
    g = np.clip(np.round(a / full * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(g, mode="L").convert("RGB")


def read_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (see the module docstring for the modes handled)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"image {str(p)!r} does not exist or is not a file")
    try:
        img = Image.open(p)
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, ValueError, EOFError) as e:
        raise UserError(f"image {str(p)!r} cannot be read as an image: {e}") from None
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in WITH_ALPHA:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        return _sixteen_bit_to_rgb(img)
    if img.mode in DIRECT:
        return img.convert("RGB")
    raise UserError(f"image {str(p)!r} has pixel mode {img.mode!r}, which cannot be converted to RGB faithfully; "
                    f"allowed: 8/16-bit grey, palette, RGB(A), CMYK, YCbCr, LAB, HSV (re-save it as PNG or JPEG)")


def fit_image(img: Image.Image, size: tuple[int, int], resize: str = "squash") -> tuple[torch.Tensor, ImageFit]:
    """``img`` fitted to ``size`` = (height, width) → ((1, 3, H, W) in [0, 1], what was done)."""
    if resize not in RESIZE_MODES:
        raise UserError(f"resize={resize!r} is not one of {list(RESIZE_MODES)}")
    h, w = size
    fit = ImageFit((img.width, img.height), (w, h), resize)
    if resize == "squash_nearest":  # the official torch path: uint8 → float tensor → nearest neighbour
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()  # (1, 3, h0, w0)
        x = torch.nn.functional.interpolate(x, (h, w)) if fit.resized else x
        return x / 255, fit
    if resize == "crop":  # the largest centred box of the model's aspect ratio
        cw, ch = min(img.width, round(img.height * w / h)), min(img.height, round(img.width * h / w))
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    kernel = Image.LANCZOS if resize == "squash_lanczos" else Image.BICUBIC
    img = img.resize((w, h), kernel) if img.size != (w, h) else img
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    return x, fit


def load_image(path: str | Path, size: tuple[int, int], resize: str = "squash") -> torch.Tensor:
    """The image at ``path`` read as RGB and fitted to ``size`` = (height, width) → (1, 3, H, W) in [0, 1]."""
    return fit_image(read_rgb(path), size, resize)[0]
