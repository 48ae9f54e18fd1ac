"""Hydra task ``train_toy``: train the toy latent-diffusion model (see toyworld/train.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(cfg) -> dict:
    """``cfg.toy`` holds the hyper-parameters (configs/experiment/train_toy.yaml)."""
    from omegaconf import OmegaConf

    from toyworld.train import train

    toy = cfg.get("toy", None) if hasattr(cfg, "get") else None
    return train(toy if toy is not None else OmegaConf.create({}))
