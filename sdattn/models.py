"""Loading SD-1.x pipelines (hub id, local diffusers folder, single checkpoint file) and building
the seeded random ``tiny`` pipeline the tests use."""

from __future__ import annotations

import copy
import importlib
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import try_to_load_from_cache
from transformers import CLIPTextConfig, CLIPTextModel

from .errors import ModelLoadError, first_line
from .hub import check_loading_info, check_no_meta_weights, hub_offline
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


def dtype_keyword(dtype: torch.dtype) -> dict:
    """The dtype argument of diffusers' loaders: ``dtype`` from diffusers 0.40 on (``torch_dtype`` is
    deprecated there and warns on every load), ``torch_dtype`` before (0.39, the declared floor)."""
    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 40) else {"torch_dtype": dtype}


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
    (default: the hub repo diffusers infers from the file, which must then be cached). Every weighted
    component is checked to have all its weights from the files (:func:`sdattn.hub.check_loading_info`).
    Raises :class:`ModelLoadError` with one line saying how to provide the weights.
    """
    torch_dtype = parse_dtype(dtype)
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelLoadError(
                f"model.path {str(p)!r} does not exist: give a diffusers folder (with model_index.json) "
                f"or a single {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint"
            )
        if p.is_dir():
            if not (p / "model_index.json").exists():
                raise ModelLoadError(f"model.path {str(p)!r} is a folder without model_index.json: "
                                     "save a pipeline with save_pretrained or give a checkpoint file")
            try:
                return load_checked_pipeline(str(p), True, torch_dtype, f"model.path {str(p)!r}")
            except ModelLoadError:
                raise
            except Exception as e:  # noqa: BLE001 - one line for the user, whatever diffusers raised
                raise ModelLoadError(f"could not load model.path {str(p)!r}: {first_line(e)}") from e
        if p.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"model.path {str(p)!r} has suffix {p.suffix!r}; "
                                 f"allowed: {', '.join(SINGLE_FILE_SUFFIXES)} or a diffusers folder")
        return load_single_file(p, config, torch_dtype)
    if not id:
        raise ModelLoadError("no model given: set model.id=<hub id> or model.path=<folder or .safetensors>")
    errors = []
    for candidate in [id, *alt_ids]:
        try:
            return load_checked_pipeline(candidate, hub_offline(), torch_dtype, f"model {candidate!r}")
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001
            errors.append(f"{candidate}: {first_line(e)}")
    tried = " or ".join(repr(c) for c in [id, *alt_ids])
    raise ModelLoadError(
        f"model {tried} is not available{' offline (HF_HUB_OFFLINE=1)' if hub_offline() else ''}: download it "
        f"once with `huggingface-cli download {id}` (then HF_HUB_OFFLINE=1 finds it in the cache), or pass "
        f"model.path=<diffusers folder or .safetensors file>"
    )


# Components an SD pipeline may list that this project never loads (no safety checker on research outputs).
SKIPPED_COMPONENTS = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@contextmanager
def quiet_loading(source: str | Path):
    """diffusers' and transformers' per-component progress bars off while ``source`` loads, when it is a local
    folder (milliseconds of bars per run); a hub download keeps its bars. Restored afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [diffusers_logging, transformers_logging] if Path(str(source)).is_dir() else []
    enabled = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip(libraries, enabled):
            if was:
                lib.enable_progress_bar()


def load_checked_pipeline(
    source: str, local_only: bool, torch_dtype: torch.dtype, what: str,
) -> StableDiffusionPipeline:
    with quiet_loading(source):
        return _load_checked_pipeline(source, local_only, torch_dtype, what)


def _load_checked_pipeline(
    source: str, local_only: bool, torch_dtype: torch.dtype, what: str,
) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline.from_pretrained(source)`` (a diffusers folder or hub id) whose weighted
    components (the torch modules ``model_index.json`` lists) are each loaded with their loading info and
    refused when a weight was missing, unexpected or of another shape, instead of running on random ones."""
    index = StableDiffusionPipeline.load_config(source, local_files_only=local_only)
    models = {}
    for name, spec in index.items():
        if name.startswith("_") or name in SKIPPED_COMPONENTS or not isinstance(spec, (list, tuple)):
            continue
        library, class_name = spec
        if library not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(library), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue
        dtype_kw = {"dtype": torch_dtype} if library == "transformers" else dtype_keyword(torch_dtype)
        model, info = cls.from_pretrained(source, subfolder=name, local_files_only=local_only,
                                          output_loading_info=True, **dtype_kw)
        check_loading_info(info, f"{name} of {what}", library, len(model.state_dict()))
        models[name] = model.eval()
    return StableDiffusionPipeline.from_pretrained(
        source, local_files_only=local_only, **dtype_keyword(torch_dtype), **models, **SKIPPED_COMPONENTS,
    )


def load_single_file(path: Path, config: str | None, torch_dtype: torch.dtype) -> StableDiffusionPipeline:
    """An original-format SD checkpoint file through diffusers' ``from_single_file``, its configs from
    ``config`` (a diffusers folder or hub id) or else the hub repo diffusers infers from the file's keys
    (from the cache when offline). Refused when a weight was not in the file."""
    what = f"model.path {str(path)!r}"
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=config, local_files_only=hub_offline(), **dtype_keyword(torch_dtype),
            **SKIPPED_COMPONENTS,
        )
    except Exception as e:  # noqa: BLE001 - one line for the user, whatever diffusers raised
        raise single_file_error(path, config, e) from e
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            check_no_meta_weights(component, f"{name} of {what}")
    return pipe


def single_file_error(path: Path, config: str | None, error: Exception) -> ModelLoadError:
    """The one line for a failed ``from_single_file``, naming the cause that applies: an unreadable file,
    the configs it needs (the hub repo diffusers infers from it, not in the cache), or the loading error."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

    what = f"model.path {str(path)!r}"
    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        return ModelLoadError(f"could not load {what}: it is not a readable checkpoint ({first_line(e)})")
    if config is None:
        try:
            repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
        except Exception:  # noqa: BLE001 - diffusers does not know the architecture
            repo = None
        if repo is None:
            return ModelLoadError(
                f"could not load {what}: diffusers does not recognise its architecture; pass "
                f"model.config=<diffusers folder of the same architecture> ({first_line(error)})")
        if try_to_load_from_cache(repo, "model_index.json") is None:
            return ModelLoadError(
                f"could not load {what}: a single file needs the diffusers configs of {repo!r}, which are not in "
                f"the cache: download them once with `huggingface-cli download {repo} --include '*.json' '*.txt'` "
                f"or pass model.config=<local diffusers folder of the same architecture> ({first_line(error)})")
    with_config = f" with model.config {config!r}" if config is not None else ""
    return ModelLoadError(f"could not load {what}{with_config}: {first_line(error)}")


def twin_pipeline(pipe):
    """A pipeline sharing every weight tensor with ``pipe`` but with its own UNet modules (and so its
    own attention processors: hooks installed on one never reach the other) and its own tokenizer (a
    tokenizer call sets padding and truncation on the shared backend: two threads calling one tokenizer
    read each other's settings). VAE, text encoder and scheduler are shared."""
    unet = pipe.unet
    shared = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    twin = copy.deepcopy(unet, shared)  # module tree copied; tensors in the memo are reused, not copied
    twin_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": twin, "tokenizer": copy.deepcopy(pipe.tokenizer)},
                                        requires_safety_checker=False)
    twin_pipe.set_progress_bar_config(disable=True)
    return twin_pipe
