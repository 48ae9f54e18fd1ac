"""Hydra task ``train_toy_clip``: train the toy world's CLIP (see toyworld/clip.py)."""

from __future__ import annotations


def run(cfg) -> dict:
    """``cfg.toy_clip`` holds the hyper-parameters (configs/experiment/train_toy_clip.yaml)."""
    from omegaconf import OmegaConf

    from toyworld.clip import train

    node = cfg.get("toy_clip", None) if hasattr(cfg, "get") else None
    return train(node if node is not None else OmegaConf.create({}))
