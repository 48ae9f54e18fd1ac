"""Helpers shared by the task functions: model from config, output folder, logger."""

from __future__ import annotations

from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate as _instantiate
from omegaconf import DictConfig, OmegaConf

from sdattn.errors import UserError
from sdattn.fingerprint import settings_fingerprint, source_fingerprint
from sdattn.models import load_pipeline
from sdattn.speed import accelerate


def instantiate(node, *args, **kwargs):
    """``hydra.utils.instantiate`` that lets our one-line user errors through unwrapped."""
    try:
        return _instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise


def plain(value):
    """A config node as plain Python (dicts, lists, scalars; interpolations resolved); anything else as is."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def load_model(cfg: DictConfig):
    """The pipeline of ``cfg.model`` on ``cfg.device``; ``model.path`` (if set) wins over the preset."""
    m = cfg.model
    if m.get("path"):
        pipe = load_pipeline(path=m.path, config=m.get("config"), dtype=cfg.dtype)
    else:
        pipe = instantiate(m.pipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(cfg.device)
    return accelerate(pipe) if cfg.get("compile") else pipe


def model_identity(cfg: DictConfig) -> dict:
    """What identifies the model's weights (for cache keys)."""
    m = OmegaConf.to_container(cfg.model, resolve=True)
    return {"name": m.get("name"), "path": m.get("path"), "pipeline": m.get("pipeline"), "dtype": cfg.dtype}


def model_fingerprint(cfg: DictConfig, pipe) -> str:
    """What identifies the weights ``pipe`` was loaded from for ``cfg.model`` (:mod:`sdattn.fingerprint`):
    ``model.path``'s file or folder by its contents, a hub id (the one that loaded) by its cached revision,
    a model built in memory (``tiny``, ``sd15_shaped``) by its build settings (seed included; the device
    left out, as everywhere in the record meta)."""
    m = cfg.model
    if m.get("path"):
        return source_fingerprint(m.path, "model_index.json")
    source = getattr(pipe, "name_or_path", None)
    if source:
        return source_fingerprint(source, "model_index.json")
    spec = dict(plain(m.pipeline))
    spec.pop("device", None)
    return settings_fingerprint(spec)


def output_dir(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_logger(cfg: DictConfig, **overrides):
    """The configured Lightning logger of a training loop (``overrides``: e.g. its name / save_dir), or None
    (``logger=none``). A W&B logger gets its run from :func:`experiments.tracking.start_wandb` (group, job
    type, tags and config as every run's), its metrics against the trainer's step."""
    from experiments.tracking import logger_kind, start_wandb

    kind = logger_kind(cfg)
    if kind is None:
        return None
    if kind == "wandb":
        run = start_wandb(cfg, overrides.get("name"), overrides.get("save_dir"))
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        overrides = {**overrides, "experiment": run}
    return instantiate(cfg.logger, **overrides)


def close_logger(logger) -> None:
    """Finalize a Lightning logger and end its W&B run (so the next job in a multirun starts its own)."""
    logger.finalize("success")
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()
