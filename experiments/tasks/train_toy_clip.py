"""Hydra task ``train_toy_clip``: train the toy world's CLIP (see toyworld/clip.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from toyworld.clip import train


def run(cfg: DictConfig) -> dict:
    """``cfg.toy_clip`` holds the settings (configs/experiment/train_toy_clip.yaml)."""
    return train(cfg.toy_clip)
