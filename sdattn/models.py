"""Loading SD-1.x pipelines (hub id, local diffusers folder, single checkpoint file) and building
the seeded random ``tiny`` pipeline the tests use."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .errors import ModelLoadError, first_line
from .hub import hub_offline
from .tokenizer import build_word_tokenizer

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt")

# Stable Diffusion 1.x's DDIM settings (used for the tiny model too, so its step maths is SD's).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in allowed:
        raise ModelLoadError(f"dtype {name!r} is not one of {sorted(allowed)}")
    return allowed[name]


def read_vocab(path: str | Path) -> list[str]:
    """Words of a vocabulary file: one or more per line, ``#`` starts a comment."""
    words: list[str] = []
    for line in Path(path).read_text().splitlines():
        words += line.split("#", 1)[0].split()
    return sorted(set(words))


def build_tiny_pipeline(
    vocab_file: str | Path,
    seed: int = 0,
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (32, 32, 64, 64),
    layers_per_block: int = 2,
    attention_head_dim: int = 8,
    cross_attention_dim: int = 32,
    norm_num_groups: int = 8,
    vae_channels: tuple[int, ...] = (16, 32),
    vae_layers_per_block: int = 1,
    text_layers: int = 2,
    text_heads: int = 4,
    text_intermediate_size: int | None = None,
    text_vocab_size: int | None = None,
    model_max_length: int = 77,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> StableDiffusionPipeline:
    """An SD-1.x-shaped pipeline with seeded random weights (no download).

    Default: the UNet has SD 1.5's block layout (3 cross-attention down blocks, mid, 3 cross-attention
    up blocks, ``layers_per_block=2``) so its 16 self + 16 cross layers follow SD's numbering, at
    16×16 latents (32 px images through a 2× VAE). ``configs/model/sd15_shaped.yaml`` gives SD 1.5's
    exact shapes (for timing and memory only: random weights make meaningless images).

    Each part is created directly on ``device`` (weights initialised there, never a CPU copy) and
    cast to ``dtype`` before the next part is built, so at most one part is held in float32.
    ``text_intermediate_size`` defaults to 2 × ``cross_attention_dim``; ``text_vocab_size`` (≥ the
    tokenizer's size; extra rows are never looked up) to the tokenizer's size.
    """
    block_out_channels, vae_channels = tuple(block_out_channels), tuple(vae_channels)
    n = len(block_out_channels)
    device, dtype = torch.device(device), parse_dtype(dtype)
    tokenizer = build_word_tokenizer(read_vocab(vocab_file), model_max_length)
    if text_vocab_size is not None and text_vocab_size < len(tokenizer):
        raise ModelLoadError(f"text_vocab_size {text_vocab_size} is smaller than the tokenizer's "
                             f"{len(tokenizer)} tokens")

    def build(offset: int, make):
        torch.manual_seed(seed + offset)
        with device:
            part = make()
        # nn.Module.to: casts floating-point tensors only (diffusers' own .to warns about fp32-kept modules)
        return torch.nn.Module.to(part, dtype=dtype).eval()

    unet = build(0, lambda: UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    ))
    vae = build(1, lambda: AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vae_channels,
        layers_per_block=vae_layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size * 2 ** (len(vae_channels) - 1),
    ))
    text_encoder = build(2, lambda: CLIPTextModel(
        CLIPTextConfig(
            hidden_size=cross_attention_dim,
            intermediate_size=text_intermediate_size or 2 * cross_attention_dim,
            num_attention_heads=text_heads,
            num_hidden_layers=text_layers,
            vocab_size=text_vocab_size or len(tokenizer),
            max_position_embeddings=model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(
    id: str | None = None,
    path: str | None = None,
    alt_ids: list[str] | tuple[str, ...] = (),
    config: str | None = None,
    dtype: str = "float32",
) -> StableDiffusionPipeline:
    """An SD-1.x pipeline from ``path`` (diffusers folder or single checkpoint file) or hub ``id``.

    Single files need the diffusers configs: ``config`` names a local diffusers folder or a hub id
    (default: the hub's SD-1.5 configs, which must then be cached). Raises :class:`ModelLoadError`
    with one line saying how to provide the weights.
    """
    torch_dtype = parse_dtype(dtype)
    common = dict(torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelLoadError(
                f"model.path {str(p)!r} does not exist: give a diffusers folder (with model_index.json) "
                f"or a single {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint"
            )
        try:
            if p.is_dir():
                if not (p / "model_index.json").exists():
                    raise ModelLoadError(f"model.path {str(p)!r} is a folder without model_index.json: "
                                         "save a pipeline with save_pretrained or give a checkpoint file")
                return StableDiffusionPipeline.from_pretrained(p, local_files_only=True, **common)
            if p.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(f"model.path {str(p)!r} has suffix {p.suffix!r}; "
                                     f"allowed: {', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder")
            return StableDiffusionPipeline.from_single_file(
                str(p), config=config, local_files_only=hub_offline(), torch_dtype=torch_dtype,
            )
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - one line for the user, whatever diffusers raised
            hint = " (single files need model.config=<local diffusers folder>)" if p.is_file() else ""
            raise ModelLoadError(f"could not load model.path {str(p)!r}{hint}: {first_line(e)}") from e
    if not id:
        raise ModelLoadError("no model given: set model.id=<hub id> or model.path=<folder or .safetensors>")
    errors = []
    for candidate in [id, *alt_ids]:
        try:
            return StableDiffusionPipeline.from_pretrained(candidate, local_files_only=hub_offline(), **common)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{candidate}: {first_line(e)}")
    tried = " or ".join(repr(c) for c in [id, *alt_ids])
    raise ModelLoadError(
        f"model {tried} is not available{' offline (HF_HUB_OFFLINE=1)' if hub_offline() else ''}: download it "
        f"once with `huggingface-cli download {id}` (then HF_HUB_OFFLINE=1 finds it in the cache), or pass "
        f"model.path=<diffusers folder or .safetensors file>"
    )
