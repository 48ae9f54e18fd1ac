"""Hydra task ``train_toy_clip``: train the toy world's CLIP (see toyworld/clip.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from experiments.common import make_logger
from toyworld.clip import train


def run(cfg: DictConfig) -> dict:
    """``cfg.toy_clip`` holds the settings (configs/experiment/train_toy_clip.yaml)."""
    return train(cfg.toy_clip, make_logger=lambda stage, save_dir: make_logger(cfg, name=f"toy-{stage}",
                                                                         save_dir=str(save_dir)))
