"""How well the model can represent a real image: the PSNR of its reconstruction against the input.

Every real-image edit starts from the image's VAE latent, so the VAE's round trip (encode, decode) is
the best reconstruction any inversion through it can reach — and exactly FPE's DDIM reconstruction,
whose source branch is re-anchored to the inverted trajectory. Below ``min_reconstruction_psnr``
(``configs/run.yaml``; README "Real images") the model cannot represent the image, and an edit shows
what the model makes of it rather than an edit of the photo: the run says so in one line.
"""

from __future__ import annotations

import torch

from editing.images import fit_image, read_rgb
from editing.inversion import image_size
from sdattn.sampling import decode, encode_image

from .metrics import psnr


def reconstruction_psnr(reconstruction: torch.Tensor, image: torch.Tensor) -> float:
    """PSNR (dB) of ``reconstruction`` against ``image``, both (1, 3, H, W) in [0, 1]."""
    return float(psnr(reconstruction.float().cpu(), image.float().cpu())[0])


@torch.no_grad()
def round_trip_psnr(pipe, image: torch.Tensor) -> float:
    """PSNR (dB) of ``image`` (1, 3, H, W) in [0, 1] after the model's VAE encodes and decodes it."""
    return reconstruction_psnr(decode(pipe, encode_image(pipe, image)), image)


def reconstruction_line(value: float, minimum: float, what: str = "the VAE round trip (the best any "
                        "inversion can do)") -> str:
    """The line a real-image run prints about its reconstruction."""
    return f"reconstruction of the input image: {value:.1f} dB PSNR by {what}; warned below {minimum:g} dB"


def reconstruction_warning(value: float, minimum: float, model: str) -> str | None:
    """One ``warning:`` line when ``value`` is below ``minimum`` (None otherwise)."""
    if not value < minimum:
        return None
    return (f"warning: model {model} reconstructs this image at {value:.1f} dB PSNR (< min_reconstruction_psnr="
            f"{minimum:g}): it cannot represent it, so the edit shows what the model makes of it, not an edit "
            "of the photo")


class ReconstructionCheck:
    """A benchmark scorer: ``reconstruction_psnr`` (the VAE round trip of the input as the model sees it,
    once per image) for every real-image pair, and the warning line for the images below ``minimum``."""

    def __init__(self, pipe, resize: str, minimum: float, model: str):
        self.pipe, self.resize, self.minimum, self.model = pipe, resize, float(minimum), model
        self.values: dict[str, float] = {}  # image path → PSNR

    def __call__(self, example, source, edited) -> dict:
        path = example.image_path
        if path is None:
            return {}
        if path not in self.values:
            image, _ = fit_image(read_rgb(path), image_size(self.pipe), self.resize)
            self.values[path] = round_trip_psnr(self.pipe, image)
        return {"reconstruction_psnr": self.values[path]}

    def warning(self) -> str | None:
        low = {p: v for p, v in self.values.items() if v < self.minimum}
        if not low:
            return None
        first = next(iter(low))
        return (f"warning: model {self.model} reconstructs {len(low)} of {len(self.values)} real images below "
                f"min_reconstruction_psnr={self.minimum:g} dB (first: {first}, {low[first]:.1f} dB): it cannot "
                "represent them, so their edits show what the model makes of them")
