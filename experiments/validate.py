"""One check of the composed run config, before anything is loaded or written.

Every value a task reads that can be checked without the model is checked here, once: a bad one
raises :class:`UserError` naming the key, the value and what is allowed. (Values that need the model —
layer indices, prompt words, image sizes — are checked where the model is known, still before any work.)
"""

from __future__ import annotations

import math
import numbers

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from editing.images import RESIZE_MODES
from evaluation.shards import parse_shard
from sdattn.errors import UserError
from sdattn.steps import StepSpec

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed's range for non-negative seeds
DTYPES = ("float32", "float16", "bfloat16")
STEP_COUNTS = ("num_inference_steps", "inversion_steps", "model.steps")  # int ≥ 1 (by name, or full key)
STEP_WINDOWS = ("self_replace_steps", "cross_replace_steps", "feature_steps", "attn_steps")  # sdattn.steps specs
FRACTIONS = ("strength", "inpaint_strength", "mask_encode_strength", "test_fraction")
# Ablation nodes (configs/ablation/*.yaml, placed at ``ablation`` or ``claims.ablations.<name>``): their
# ``steps`` is a fraction of the sampling steps; ``steps`` elsewhere (model.steps, probe.steps) is not.
ABLATION_NODES = ("ablation", "claims.ablations.*")
POSITIVE_INTS = ("limit", "n_per_class", "batch_size", "per_combo", "n", "threads", "components", "pairs_per_kind",
                 "bootstrap")
GUIDANCE = ("guidance_scale", "image_guidance_scale")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_seed(key: str, value) -> None:
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise UserError(f"{key}={value!r} is not a seed; allowed: an integer 0..{SEED_MAX}")


def _in_node(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``key``'s parent path matches one of ``patterns`` (dotted; ``*`` is one whole key)."""
    parent = key.split(".")[:-1]
    return any(len(p.split(".")) == len(parent) and all(a in ("*", b) for a, b in zip(p.split("."), parent))
               for p in patterns)


def _check_value(key: str, name: str, value) -> None:
    """The rule of one leaf by its key name (``name`` is the last part of the dotted ``key``)."""
    if value is None:
        return
    if name in STEP_COUNTS or key in STEP_COUNTS:
        if not _is_int(value) or value < 1:
            raise UserError(f"{key}={value!r} is not a step count; allowed: an integer ≥ 1")
    elif name in GUIDANCE:
        if not _is_number(value) or not math.isfinite(value) or value < 1:
            raise UserError(f"{key}={value!r} is not a guidance scale; allowed: a finite number ≥ 1 "
                            "(1 disables classifier-free guidance)")
    elif name in STEP_WINDOWS or (name == "steps" and _in_node(key, ABLATION_NODES)):
        StepSpec.parse(value, "fraction", key)
    elif name in FRACTIONS:
        if not _is_number(value) or not (math.isfinite(value) and 0 <= value <= 1):
            raise UserError(f"{key}={value!r} is outside [0, 1]; allowed: a fraction")
    elif name in POSITIVE_INTS:
        if not _is_int(value) or value < 1:
            raise UserError(f"{key}={value!r}: allowed an integer ≥ 1 (or null for the default)")
    elif name == "shard":  # benchmark.shard, probe.shard: i/n
        parse_shard(value, key)
    elif name == "seed" or (name == "seeds" and not isinstance(value, list)):
        check_seed(key, value)
    elif name == "seeds":
        if not value:
            raise UserError(f"{key}=[] is empty; allowed: a list of integer seeds")
        for i, s in enumerate(value):
            check_seed(f"{key}[{i}]", s)


def _walk(node, prefix: str = ""):
    """(dotted key, last key, plain value) of every leaf and list of ``node``."""
    for k, v in node.items():
        key = f"{prefix}{k}"
        yield key, str(k), v
        if isinstance(v, dict):
            yield from _walk(v, key + ".")


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device={device!r} is not a torch device; allowed: cpu, cuda, cuda:<n>, mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available here; use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={device!r} but MPS is not available here; use device=cpu")


def resolved(cfg: DictConfig, skip: tuple[str, ...] = ("hydra",)) -> dict:
    """The config as plain Python with every interpolation resolved (a broken one is a UserError)."""
    plain = {}
    for k in cfg:
        if k in skip:
            continue
        try:
            v = cfg[k]
            plain[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
        except OmegaConfBaseException as e:
            raise UserError(f"config {k!r} cannot be resolved: {str(e).splitlines()[0]}") from e
    return plain


def validate(cfg: DictConfig) -> dict:
    """Check the composed config (see the module docstring); returns it resolved, as plain Python."""
    plain = resolved(cfg, skip=("hydra", "paths"))
    if plain.get("dtype") not in DTYPES:
        raise UserError(f"dtype={plain.get('dtype')!r} is not one of {list(DTYPES)}")
    check_device(str(plain.get("device")))
    if plain.get("resize") not in RESIZE_MODES:
        raise UserError(f"resize={plain.get('resize')!r} is not one of {list(RESIZE_MODES)}")
    for key, name, value in _walk(plain):
        if isinstance(value, dict):
            continue
        _check_value(key, name, value)
    return plain
