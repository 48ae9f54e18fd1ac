"""Hydra task ``train_toy``: train the toy latent-diffusion model (see toyworld/train.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from experiments.common import make_logger
from toyworld.train import train


def run(cfg: DictConfig) -> dict:
    """``cfg.toy`` holds the settings (configs/experiment/train_toy.yaml)."""
    return train(cfg.toy, make_logger=lambda stage, save_dir: make_logger(cfg, name=f"toy-{stage}",
                                                                         save_dir=str(save_dir)))
