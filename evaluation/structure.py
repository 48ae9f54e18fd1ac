"""DINO self-similarity structure distance (Tumanyan et al., "Splicing ViT Features for Semantic Appearance
Transfer", CVPR 2022), the "Structure Dist." of Plug-and-Play (Tumanyan et al., CVPR 2023) and PIE-Bench
(Ju et al., "Direct Inversion", ICLR 2024).

Definition, as Splice's ``VitExtractor.get_keys_self_sim_from_input(img, layer_num=11)`` (also copied into
PIE-Bench's ``evaluation/matrics_calculator.py``):

- K = keys of the last layer's self-attention of a DINO ViT: ``k_proj(layernorm_before(h))`` where ``h`` is
  the hidden state entering the last layer; one row per token, the CLS token INCLUDED (T = 1 + #patches),
  heads concatenated (D = heads · head_dim, the Linear's own output layout, as Splice's reshape of ``qkv``).
- S = cosine self-similarity of the rows of K: ``S_ij = <k_i, k_j> / max(|k_i| |k_j|, 1e-8)`` (T × T).
- distance(source, edited) = mean over the T² entries of ``(S_source − S_edited)²`` (``F.mse_loss``).
  The raw value is returned; PIE-Bench tables report it ×10³.

Preprocessing (in torch, no torchvision): images (B, 3, H, W) in [0, 1] (uint8 is divided by 255) are resized
to ``config.image_size`` × ``config.image_size`` (224 for ``facebook/dino-vitb8``; bicubic, antialiased, then
clamped to [0, 1]) and normalised with the ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
Differences from the reference code, for the record: Splice/PIE-Bench use torchvision ``Resize(224,
max_size=480)`` (shorter side to 224, bilinear) with DINO's interpolated position embeddings, which equals a
square resize only for square inputs (PIE-Bench images are 512 × 512); and PIE-Bench's
``calculate_structure_distance`` feeds 0–255 pixel values (never divided by 255) to the ImageNet normalisation,
so its absolute numbers are not reproduced here — this module uses [0, 1] inputs, as Splice does.

``DEFAULT_DINO_MODEL`` = ``facebook/dino-vitb8`` (the transformers port of DINO ViT-B/8, Splice's and
PIE-Bench's ``dino_vitb8``). Offline it must be in the Hugging Face cache or given as a local folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evaluation.metrics import check_images
from sdattn.errors import UserError
from sdattn.fingerprint import source_fingerprint
from sdattn.hub import load_pretrained
from sdattn.models import quiet_loading

DEFAULT_DINO_MODEL = "facebook/dino-vitb8"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COSINE_EPS = 1e-8


# ------------------------------------------------------------------------------ pure functions

def self_similarity_from_keys(keys: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Cosine self-similarity of token keys: (B, T, D) → (B, T, T), Splice's ``attn_cosine_sim``."""
    if not isinstance(keys, torch.Tensor) or keys.ndim != 3:
        shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise UserError(f"keys must be a (B, T, D) tensor, got {shape}")
    k = keys.float()
    norms = k.norm(dim=-1, keepdim=True)
    return (k @ k.transpose(1, 2)) / (norms @ norms.transpose(1, 2)).clamp(min=eps)


def structure_distance_from_keys(keys_a: torch.Tensor, keys_b: torch.Tensor) -> torch.Tensor:
    """mean((S_a − S_b)²) over the T × T entries per image: (B, T, D) × 2 → (B,)."""
    if not isinstance(keys_a, torch.Tensor) or not isinstance(keys_b, torch.Tensor) \
            or keys_a.shape != keys_b.shape:
        shapes = [tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__ for k in (keys_a, keys_b)]
        raise UserError(f"structure distance needs two key tensors of the same (B, T, D) shape, got {shapes}")
    sa, sb = self_similarity_from_keys(keys_a), self_similarity_from_keys(keys_b)
    return (sa - sb).pow(2).mean(dim=(1, 2))


def preprocess_dino(images: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → resized to size × size (bicubic, antialias, clamped), ImageNet-normalised."""
    x = check_images(images)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _vit_layers(model):
    """The transformer layers of a transformers ViTModel (``layers`` in v5, ``encoder.layer`` before)."""
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "encoder"):
        layers = getattr(model.encoder, "layer", None)
    if layers is None:
        raise UserError(f"{type(model).__name__} is not a transformers ViTModel (no transformer layers found)")
    return layers


def _key_linear(layer):
    """The key projection of a ViTLayer's attention (``attention.k_proj`` in v5, ``attention.attention.key``)."""
    attn = layer.attention
    if hasattr(attn, "k_proj"):
        return attn.k_proj
    return attn.attention.key


# ------------------------------------------------------------------------------------- model

class StructureDistance:
    """Splice / PIE-Bench structure distance from a transformers DINO ``ViTModel``."""

    def __init__(self, model, device: str | torch.device | None = None):
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.image_size = int(model.config.image_size)
        self._layers = _vit_layers(self.model)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_DINO_MODEL,
                        device: str | torch.device | None = None) -> StructureDistance:
        """Load a DINO ViT from a hub id (cache only when offline) or a local folder."""
        from transformers import ViTModel

        model = load_pretrained(
            lambda local_only: ViTModel.from_pretrained(name_or_path, add_pooling_layer=False,
                                                        local_files_only=local_only, output_loading_info=True),
            name_or_path, "DINO ViT model", "the ViTModel weights and config",
            ignore_unexpected=("pooler.",))  # the hub's DINO files hold a pooler that is not built here
        return cls(model, device=device)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → last-layer attention keys (B, T, heads · head_dim), CLS token first."""
        pixels = preprocess_dino(images, self.image_size).to(self.device, dtype=self._dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        # hidden_states = (embeddings, output of layer 1, ..., output of layer L): index L−1 enters layer L.
        last = self._layers[-1]
        h = out.hidden_states[len(self._layers) - 1]
        return _key_linear(last)(last.layernorm_before(h)).float()

    def self_similarity(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → cosine self-similarity of the last-layer keys (B, T, T)."""
        return self_similarity_from_keys(self.keys(images)).cpu()

    def __call__(self, source_images: torch.Tensor, edited_images: torch.Tensor) -> torch.Tensor:
        """Structure distance per source/edited pair → (B,) float, raw (PIE-Bench reports ×10³)."""
        src = check_images(source_images, "source_images")
        edt = check_images(edited_images, "edited_images")
        if src.shape[0] != edt.shape[0]:
            raise UserError(f"structure distance got {src.shape[0]} source and {edt.shape[0]} edited images; "
                            "they must match")
        return structure_distance_from_keys(self.keys(src), self.keys(edt)).cpu()


def tiny_dino(seed: int = 0, device: str | torch.device | None = None) -> StructureDistance:
    """A StructureDistance on a seeded tiny random ViTModel (32 px, patch 8, hidden 32, 2 layers, 2 heads)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    return StructureDistance(model, device=device)


def structure_fingerprint(name: str | None) -> str | None:
    """What identifies the weights ``load_structure(name)`` loads (:mod:`sdattn.fingerprint`): a folder by
    its contents, a hub id by its cached revision; None when there is no model or it is ``tiny-random``
    (built from config with a fixed seed)."""
    if no_structure_model(name) or str(name) == "tiny-random":
        return None
    return source_fingerprint(str(name), "config.json")


def no_structure_model(name: str | None) -> bool:
    """``structure: null`` or ``none``: no structure distance."""
    return name is None or str(name).strip().lower() == "none"


def load_structure(name: str | None, device: str | torch.device | None = None) -> StructureDistance | None:
    """None / "none" → None; "tiny-random" → ``tiny_dino()``; anything else → ``from_pretrained(name)``."""
    if no_structure_model(name):
        return None
    if str(name) == "tiny-random":
        return tiny_dino(device=device)
    with quiet_loading(name):
        return StructureDistance.from_pretrained(name, device=device)


class StructureScore:
    """The ``structure`` metric (``configs/metric/structure.yaml``): the DINO structure distance of
    source and edited, ``{"structure": d}``; ``fingerprint`` identifies the DINO weights."""

    def __init__(self, distance: StructureDistance, fingerprint: str | None):
        self.distance, self.fingerprint = distance, fingerprint

    def __call__(self, example, source: torch.Tensor, edited: torch.Tensor) -> dict:
        return {"structure": float(self.distance(source, edited)[0])}


def structure_score(model: str | None, device: str | torch.device | None = None) -> StructureScore | None:
    """The ``structure`` metric with the DINO ViT ``model`` (:func:`load_structure`); None (off) without one."""
    distance = load_structure(model, device=device)
    return None if distance is None else StructureScore(distance, structure_fingerprint(model))
