"""One check of the composed run config, before anything is loaded or written.

Every value a task reads that can be checked without the model is checked here, once, by the schema
of its config group (:mod:`experiments.schema`, keyed on the setting's path): a bad one raises
:class:`UserError` naming the key, the value and what is allowed. (Values that need the model — layer
indices, prompt words, image sizes — are checked where the model is known, still before any work.)
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdattn.errors import UserError

from .schema import check, task_of


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
    plain = resolved(cfg)
    check(plain, task_of(_root_=cfg))
    return plain
