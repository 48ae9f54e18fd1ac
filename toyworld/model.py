"""Architecture of the toy latent-diffusion model (SD-style components, tiny sizes)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdattn.files import REPO_ROOT
from sdattn.models import SD_SCHEDULER
from sdattn.models import load_pipeline as load_sd_pipeline
from sdattn.tokenizer import build_word_tokenizer
from toyworld.world import World

MAX_LENGTH = 16  # the default tokenizer / text encoder context (toy.text.max_length; SD's is 77)


def build_tokenizer(world: World, max_length: int = MAX_LENGTH):
    return build_word_tokenizer(world.vocabulary(), model_max_length=max_length, closed=True)


def build_vae(image_size: int, channels=(16, 32, 32), latent_channels: int = 4,
              mid_attention: bool = False) -> AutoencoderKL:
    """len(channels)-1 downsamplings: 64 px -> 16 x 16 x 4 latents for three levels.

    Without mid-block attention the VAE is fully convolutional, so it can train on crops.
    """
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=16, sample_size=image_size, scaling_factor=1.0,
        mid_block_add_attention=mid_attention,
    )


def build_text_encoder(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=hidden,
    )
    return CLIPTextModel(cfg)


def extend_context(text_encoder: CLIPTextModel, tokenizer, length: int) -> CLIPTextModel:
    """A copy of ``text_encoder`` with ``length`` positions (e.g. SD's 77) and ``tokenizer`` set to pad to it.

    The learned position embeddings are kept; every new position gets the last one's (they only ever
    hold padding). Positions before the old length encode exactly as before (the encoder is causal).
    """
    old = text_encoder.config.max_position_embeddings
    if length < old:
        raise ValueError(f"context length {length} is shorter than the text encoder's {old}")
    cfg = text_encoder.config.to_dict()
    cfg["max_position_embeddings"] = length
    new = CLIPTextModel(CLIPTextConfig.from_dict(cfg))
    state = {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    name = next(k for k in state if k.endswith("position_embedding.weight"))
    pos = state[name]  # (old, hidden)
    state[name] = torch.cat([pos, pos[-1:].expand(length - old, -1)])
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"extend_context: weights do not match (missing {missing}, unexpected {unexpected})")
    tokenizer.model_max_length = length
    return new


def clip_text_tower(clip_dir: str | Path) -> CLIPTextModel:
    """The text encoder of a ``CLIPModel`` folder (e.g. the toy CLIP, models/toy_clip) as a ``CLIPTextModel``
    (SD's text encoder is CLIP's text tower, frozen)."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_dir))
    tower = CLIPTextModel(clip.config.text_config)
    tower.load_state_dict(clip.text_model.state_dict())
    return tower


def build_unet(latent_size: int, channels=(64, 128, 128), cross_dim: int = 64, heads: int = 4,
               latent_channels: int = 4) -> UNet2DConditionModel:
    """Cross- and self-attention at latent_size, latent_size/2 and latent_size/4 (mid block).

    Down: CrossAttn(16) -> CrossAttn(8) -> Down(4) ; mid: CrossAttn(4) ;
    up: Up(4) -> CrossAttn(8) -> CrossAttn(16).
    """
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(channels), layers_per_block=1, cross_attention_dim=cross_dim,
        attention_head_dim=heads, norm_num_groups=32,
    )


def build_scheduler() -> DDIMScheduler:
    """SD's noise schedule (:data:`sdattn.models.SD_SCHEDULER`: scaled_linear 0.00085..0.012, 1000 steps,
    epsilon)."""
    return DDIMScheduler(**SD_SCHEDULER)


def assemble_pipeline(vae, unet, text_encoder, tokenizer, scheduler=None) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler or build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def load_pipeline(path: str | Path = "models/toy") -> StableDiffusionPipeline:
    """Load the shipped toy pipeline offline (a relative path is tried from the repo root too),
    through the project's one loader, ``sdattn.models.load_pipeline``."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    return load_sd_pipeline(path=str(p))
