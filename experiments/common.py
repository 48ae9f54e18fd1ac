"""Helpers shared by the task functions: model from config, output folder, logger."""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from sdattn.config import instantiate
from sdattn.errors import UserError, first_line
from sdattn.fingerprint import settings_fingerprint, source_fingerprint
from sdattn.models import load_pipeline
from sdattn.speed import accelerate

PROCESS_START = int(time.time())  # with the process id: a run id outside Hydra


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


def load_data(data_cfg: DictConfig):
    """The dataset (:class:`evaluation.datasets.LoadedDataset`) of a ``data`` config (``configs/data/<name>.yaml``):
    its ``_target_`` loader called with the config's keys (name, path, root, limit, and the loader's own options)."""
    return instantiate(data_cfg, _convert_="all")


def run_id() -> str:
    """What makes rows "timed together": one multirun (its sweep folder: jobs run one after another on
    one machine) or one run (its folder); a process-unique id outside Hydra (tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        return str(hc.sweep.dir) if hc.mode.name == "MULTIRUN" else str(hc.runtime.output_dir)
    return f"process-{os.getpid()}-{PROCESS_START}"


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


def method_config(cfg: DictConfig, name: str) -> dict:
    """``configs/method/<name>.yaml`` as this run would compose it with ``method=<name>`` (its ``${model.*}``
    etc. read from ``cfg``), plain Python; ``cfg.method`` itself (command-line overrides included) when it
    is that method. Composed with the running app's config search path (``hydra.searchpath`` included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from experiments.cli import CONFIG_DIR

    if cfg.get("method") and cfg.method.get("name") == name:
        return plain(cfg.method)
    overrides = [f"method={name}"]
    if HydraConfig.initialized() and HydraConfig.get().searchpath:
        overrides.append(f"hydra.searchpath=[{','.join(HydraConfig.get().searchpath)}]")
    try:
        if GlobalHydra.instance().is_initialized():
            node = compose("run", overrides=overrides).method
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                node = compose("run", overrides=overrides).method
    except Exception as e:  # noqa: BLE001 - Hydra's "not found" with the options, one line
        options = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
        raise UserError(f"method {name!r} is not a config of configs/method/ (options: {', '.join(options)}): "
                        f"{first_line(e)}") from None
    run = cfg.copy()  # this run's keys, the composed method's settings (interpolations resolved against them)
    with open_dict(run):
        run.method = OmegaConf.to_container(node, resolve=False)
    return plain(run.method)
