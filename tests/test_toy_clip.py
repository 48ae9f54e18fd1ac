"""Training code of the toy CLIP (toyworld/clip.py): data stream, augmentation, a short run that exports
a folder the metric loads."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluation.metrics import ClipMetrics
from toyworld import clip as C
from toyworld.world import load_world


def test_batches_have_distinct_prompts_and_pool_images_replace_renders():
    world = load_world()
    stream = iter(C.DistinctPromptStream(world, 40, seed=0))
    images, prompts = next(stream)
    assert images.shape == (40, 3, world.image_size, world.image_size) and len(set(prompts)) == 40
    assert 0 <= images.min() and images.max() <= 1
    with pytest.raises(ValueError, match="batch 1000"):
        C.DistinctPromptStream(world, 1000, seed=0)
    n = len(C.all_specs(world))
    pool = {i: torch.full((1, 3, world.image_size, world.image_size), 0.5) for i in range(n)}
    images, _ = next(iter(C.DistinctPromptStream(world, 20, seed=0, pool=pool, roundtrip_prob=1.0)))
    assert torch.all(images == 0.5)


def test_blur_keeps_constant_images_and_smooths_edges():
    x = torch.zeros(2, 3, 16, 16)
    x[:, :, :, 8:] = 1.0
    y = C._blur(x, torch.tensor([1.0, 1.0]))
    assert y.shape == x.shape and torch.allclose(C._blur(torch.full_like(x, 0.3), torch.tensor([1.0, 2.0])),
                                                 torch.full_like(x, 0.3), atol=1e-6)
    assert 0 < y[0, 0, 0, 7] < 0.5 < y[0, 0, 0, 8] < 1


def test_short_training_run_exports_a_loadable_clip(tmp_path):
    out = tmp_path / "clip"
    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "experiment" / "train_toy_clip.yaml")
    res = C.train(OmegaConf.merge(yaml.toy_clip, {
                   "steps": 2, "batch": 8, "eval_renders": 14, "vae_path": None,
                   "budget_minutes": 2, "output_dir": str(out), "work_dir": str(tmp_path / "work"),
                   "vision": {"hidden": 32, "layers": 1, "heads": 2}, "text": {"hidden": 32, "layers": 1, "heads": 2},
                   "projection_dim": 16}))
    assert res["steps"] == 2 and set(res["eval"]) == {"renders"}
    meta = json.loads((out / "toy_clip.json").read_text())
    assert meta["zero_shot"]["renders"]["n"] == 14
    clip = ClipMetrics.from_pretrained(str(out))
    world = load_world()
    img = torch.from_numpy(world.render("red", "car", seed=0).image).permute(2, 0, 1)[None] / 255.0
    score = clip.clip_score(img, ["a red car"])
    assert score.shape == (1,) and np.isfinite(score.item())
