"""Every config composes, and every object it names instantiates (or fails with a clear line)."""

import pytest
from hydra.utils import instantiate

from experiments.common import close_logger, load_model, make_logger
from sdattn.errors import ModelLoadError

from .conftest import ROOT

GROUPS = ["model", "probe", "edit", "trainer", "logger", "experiment", "data", "method"]


def _options(group):
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes(group, option, compose_cfg):
    # SD-1.5-sized random weights: built on the meta device here (shapes only; test_models checks them)
    cfg = compose_cfg(f"{group}={option}", *(["device=meta"] if option == "sd15_shaped" else []))
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "model":
        if cfg.model.pipeline._target_.endswith("load_pipeline") and not cfg.model.path:
            with pytest.raises(ModelLoadError, match=str(cfg.model.id or 'model.path')):
                load_model(cfg)
        elif not cfg.model.path:
            assert load_model(cfg).unet is not None
    if group == "trainer":
        assert instantiate(cfg.trainer)(max_epochs=1) is not None
    if group == "logger":
        logger = make_logger(cfg)
        assert (logger is None) == (option == "none")
        if logger is not None:
            close_logger(logger)


def test_unknown_option_is_rejected(compose_cfg):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="probe"):
        compose_cfg("probe=nonsense")
