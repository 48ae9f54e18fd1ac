"""Editing metrics: CLIP score, CLIP directional similarity, PSNR, SSIM — all in torch, no torchvision
(PSNR and SSIM also as the ``psnr`` / ``ssim`` metric plug-ins, :mod:`evaluation.scorers`).

- CLIP score (torchmetrics' ``CLIPScore`` definition): ``100 · max(cos(E_I, E_T), 0)`` per image–prompt pair.
- CLIP directional similarity (Gal et al., StyleGAN-NADA; as diffusers' evaluation guide): with L2-normalised
  embeddings, ``cos(E_I(edited) − E_I(source), E_T(target) − E_T(source))``; 0 when either difference is 0.
- PSNR / SSIM: ``torchmetrics.functional.image`` on images in [0, 1] (``data_range=1``), per image.

Images are (B, 3, H, W) float tensors in [0, 1]. CLIP preprocessing reproduces ``CLIPImageProcessor``
in torch: resize the shorter side to ``config.vision_config.image_size`` (bicubic, antialiased), centre
crop to a square of that size, clamp to [0, 1], normalise with the CLIP mean/std. (The transformers
image processors and torchmetrics' ``CLIPScore`` are not used: the former need torchvision here, the
latter reads ``get_image_features`` as a tensor, which transformers 5 returns as a ModelOutput.)

``DEFAULT_CLIP_MODEL`` = ``openai/clip-vit-large-patch14``: the CLIP ViT-L/14 that SD-1.x's text encoder
comes from and the usual choice for CLIP score in editing papers. Offline, it must be in the Hugging Face
cache or given as a local folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sdattn.errors import UserError
from sdattn.hub import load_pretrained

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------ pure functions

def clip_score_from_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """100 · max(cos(image, text), 0) per row: (B, D), (B, D) → (B,)."""
    cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return 100.0 * cos.clamp(min=0)


def directional_similarity_from_features(src_image: torch.Tensor, edited_image: torch.Tensor,
                                         src_text: torch.Tensor, tgt_text: torch.Tensor,
                                         normalize: bool = True) -> torch.Tensor:
    """cos(E_I(edited) − E_I(src), E_T(tgt) − E_T(src)) per row, embeddings L2-normalised first."""
    feats = [t.float() for t in (src_image, edited_image, src_text, tgt_text)]
    if normalize:
        feats = [F.normalize(t, dim=-1) for t in feats]
    si, ei, st, tt = feats
    return F.cosine_similarity(ei - si, tt - st, dim=-1, eps=1e-8)


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"{what} must be a (B, 3, H, W) tensor in [0, 1], got {shape}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, 1]: (B, 3, H, W) × 2 → (B,). Identical images give inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    preds, target = check_images(preds, "preds"), check_images(target, "target")
    return peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian 11×11, σ 1.5) of images in [0, 1]: → (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    preds, target = check_images(preds, "preds"), check_images(target, "target")
    return structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")


def psnr_score(example, source: torch.Tensor, edited: torch.Tensor) -> dict:
    """The ``psnr`` metric (``configs/metric/psnr.yaml``): PSNR (dB) of edited against source; None for
    identical images (∞)."""
    value = float(psnr(edited, source)[0])
    return {"psnr": value if math.isfinite(value) else None}


def ssim_score(example, source: torch.Tensor, edited: torch.Tensor) -> dict:
    """The ``ssim`` metric (``configs/metric/ssim.yaml``): SSIM of edited against source."""
    return {"ssim": float(ssim(edited, source)[0])}


def preprocess_images(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP preprocessing in torch: shorter side → ``size`` (bicubic, antialias), centre crop, normalise."""
    x = check_images(images)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------------------- CLIP

class ClipMetrics:
    """CLIP score and directional similarity from a transformers ``CLIPModel`` + ``CLIPTokenizer``."""

    def __init__(self, model, tokenizer, device: str | torch.device | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        vc = model.config.vision_config
        self.image_size = int(vc.image_size)
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                              int(model.config.text_config.max_position_embeddings))

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_CLIP_MODEL,
                        device: str | torch.device | None = None) -> ClipMetrics:
        """Load model + tokenizer from a hub id (cache only when offline) or a local folder."""
        from transformers import CLIPModel, CLIPTokenizer

        def load(local_only: bool):
            model, info = CLIPModel.from_pretrained(name_or_path, local_files_only=local_only,
                                                    output_loading_info=True)
            return (model, CLIPTokenizer.from_pretrained(name_or_path, local_files_only=local_only)), info

        model, tokenizer = load_pretrained(load, name_or_path, "CLIP model",
                                           "the CLIPModel weights and tokenizer files")
        return cls(model, tokenizer, device=device)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → projected image embeddings (B, D), not normalised."""
        pixels = preprocess_images(images, self.image_size).to(self.device, dtype=self._dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled).float()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """list of prompts → projected text embeddings (B, D), not normalised."""
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device))
        return self.model.text_projection(out.pooler_output).float()

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def clip_score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """100 · max(cos(E_I, E_T), 0) per image–prompt pair → (B,)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise UserError(f"clip_score got {images.shape[0]} images and {len(prompts)} prompts; "
                            "they must match")
        return clip_score_from_features(self.image_features(images), self.text_features(prompts)).cpu()

    def directional_similarity(self, src_images: torch.Tensor, edited_images: torch.Tensor,
                               src_prompts: Sequence[str], tgt_prompts: Sequence[str]) -> torch.Tensor:
        """cos(E_I(edited) − E_I(src), E_T(tgt) − E_T(src)) → (B,)."""
        return self.pair_scores(src_images, edited_images, src_prompts, tgt_prompts, "directional_similarity")[1]

    def pair_scores(self, src_images: torch.Tensor, edited_images: torch.Tensor, src_prompts: Sequence[str],
                    tgt_prompts: Sequence[str], what: str = "pair_scores") -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP score of edited vs target prompt, directional similarity) → (B,), (B,), each embedding
        computed once (a benchmark pair needs both)."""
        src_prompts = [src_prompts] if isinstance(src_prompts, str) else list(src_prompts)
        tgt_prompts = [tgt_prompts] if isinstance(tgt_prompts, str) else list(tgt_prompts)
        n = {src_images.shape[0], edited_images.shape[0], len(src_prompts), len(tgt_prompts)}
        if len(n) != 1:
            raise UserError(f"{what} needs equal counts, got {src_images.shape[0]} source "
                            f"images, {edited_images.shape[0]} edited images, {len(src_prompts)} source "
                            f"and {len(tgt_prompts)} target prompts")
        edited, target = self.image_features(edited_images), self.text_features(tgt_prompts)
        directional = directional_similarity_from_features(
            self.image_features(src_images), edited, self.text_features(src_prompts), target)
        return clip_score_from_features(edited, target).cpu(), directional.cpu()
