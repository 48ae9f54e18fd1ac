"""The toy world's own CLIP: a small transformers ``CLIPModel`` trained contrastively on rendered
toy-world images and their prompts, so that CLIP score and CLIP directional similarity mean
something offline (``metrics.clip=toy`` → ``models/toy_clip``).

Training data: endless seeded batches of renders whose prompts are all different within a batch
(the grammar has |colours|·|shapes|·|backgrounds| prompts, so a batch is a random subset of them
and the in-batch negatives are true negatives). Images the editors produce come out of the toy
model's VAE, so a share of each batch is a VAE round-trip (encode → decode; from a pool made once
at the start), and a share is lightly blurred / noised. Images are preprocessed exactly as the
metric does (:func:`evaluation.metrics.preprocess_images`). Lightning runs the loop.

    python -m experiments.run experiment=train_toy_clip [toy_clip.budget_minutes=10 toy_clip.output_dir=...]

The settings and their defaults are the ``toy_clip:`` node of configs/experiment/train_toy_clip.yaml.

The exported folder holds the ``CLIPModel`` weights, the toy tokenizer and ``toy_clip.json`` with
the zero-shot accuracies measured on held-out renders (plain and VAE round-trip).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from evaluation.metrics import ClipMetrics, preprocess_images
from sdattn.files import atomic_write_text
from toyworld.model import MAX_LENGTH, build_tokenizer
from toyworld.train import StageLogger, finish_training_logger, fit_quietly, output_path, resolve_path
from toyworld.world import World, load_world


def all_specs(world: World) -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) the grammar can name, in a fixed order."""
    return list(itertools.product(world.colors, world.shapes, world.backgrounds))


def build_clip(tokenizer, image_size: int, cfg: DictConfig):
    """A small ``CLIPModel`` for ``image_size`` px images and the toy tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    v, t = cfg.vision, cfg.text
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(
        text_config=dict(hidden_size=t.hidden, intermediate_size=4 * t.hidden, num_hidden_layers=t.layers,
                         num_attention_heads=t.heads, max_position_embeddings=MAX_LENGTH, **ids),
        vision_config=dict(hidden_size=v.hidden, intermediate_size=4 * v.hidden, num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, image_size=image_size, patch_size=v.patch),
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(config)


# --------------------------------------------------------------------------------------- data

class DistinctPromptStream(torch.utils.data.IterableDataset):
    """Endless seeded batches: renders (B, 3, H, W) in [0, 1] whose prompts are pairwise different.

    With a ``pool`` ({spec index: (k, 3, H, W) VAE round-trips of renders of that spec}), each image
    is replaced by a random pool image of its spec with probability ``roundtrip_prob``."""

    def __init__(self, world: World, batch: int, seed: int, pool: dict | None = None, roundtrip_prob: float = 0.0):
        self.world, self.seed, self.pool, self.roundtrip_prob = world, seed, pool, roundtrip_prob
        self.specs = all_specs(world)
        if not 1 <= batch <= len(self.specs):
            raise ValueError(f"batch {batch} must be in 1..{len(self.specs)} (prompts of the grammar)")
        self.batch = batch

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            pick = rng.choice(len(self.specs), self.batch, replace=False)
            renders = [self.world.render(*self.specs[i], rng=rng) for i in pick]
            images = torch.from_numpy(np.stack([r.image for r in renders])).permute(0, 3, 1, 2).float() / 255.0
            if self.pool:
                for row, i in enumerate(pick):
                    if rng.random() < self.roundtrip_prob:
                        images[row] = self.pool[int(i)][rng.integers(len(self.pool[int(i)]))]
            yield images, [r.prompt for r in renders]


@torch.no_grad()
def vae_roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] → encoded and decoded by ``vae`` (latent mode), same range."""
    return torch.cat([(vae.decode(vae.encode(c * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
                      for c in images.split(64)])


def roundtrip_pool(world: World, vae, per_spec: int, seed: int) -> dict[int, torch.Tensor]:
    """{spec index: (per_spec, 3, H, W)} renders of every spec passed through ``vae`` once."""
    rng = np.random.default_rng(seed)
    specs = all_specs(world)
    images = np.stack([world.render(*s, rng=rng).image for s in specs for _ in range(per_spec)])
    x = vae_roundtrip(vae, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    return {i: x[i * per_spec:(i + 1) * per_spec] for i in range(len(specs))}


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur: x (B, 3, H, W), sigma (B,) in pixels."""
    radius = 3
    r = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    k = k / k.sum(-1, keepdim=True)  # (B, 7)
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kx = k.repeat_interleave(c, 0)[:, None, None, :]  # (B·3, 1, 1, 7)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kx, groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kx.transpose(-1, -2), groups=b * c)
    return y.reshape(b, c, h, w)


class Augment:
    """Blur and noise, each on a random share of the batch."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] → augmented, same shape and range."""
        b = x.shape[0]
        x = x.clone()
        m = torch.rand(b, generator=g) < self.cfg.blur_prob
        if m.any():
            x[m] = _blur(x[m], 0.3 + 1.2 * torch.rand(int(m.sum()), generator=g))
        m = torch.rand(b, generator=g) < self.cfg.noise_prob
        if m.any():
            x[m] = x[m] + torch.randn(x[m].shape, generator=g) * (0.03 * torch.rand(1, generator=g))
        return x.clamp(0, 1)


# ------------------------------------------------------------------------------------ training

class ClipModule(L.LightningModule):
    def __init__(self, model, tokenizer, augment: Augment, cfg: DictConfig):
        super().__init__()
        self.model, self.tokenizer, self.augment, self.cfg = model, tokenizer, augment, cfg
        self.image_size = int(model.config.vision_config.image_size)
        self.g = torch.Generator().manual_seed(int(cfg.seed) + 1)

    def training_step(self, batch, _):
        images, prompts = batch
        x = self.augment(images, self.g)
        enc = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         pixel_values=preprocess_images(x, self.image_size), return_loss=True)
        with torch.no_grad():
            hit = (out.logits_per_image.argmax(-1) == torch.arange(len(prompts))).float().mean()
        self.log_dict({"loss": out.loss, "batch_acc": hit, "logit_scale": self.model.logit_scale.exp()},
                      prog_bar=True)
        return out.loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = int(self.cfg.steps)
        warm = int(self.cfg.warmup)

        def factor(step):
            if step < warm:
                return (step + 1) / warm
            return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}


@torch.no_grad()
def zero_shot(clip, world: World, images: torch.Tensor, specs: list[tuple[str, str, str]]) -> dict:
    """Accuracy of picking the right colour / shape / background (and the exact prompt) among all
    prompts of the grammar. ``clip``: :class:`evaluation.metrics.ClipMetrics`; images (N, 3, H, W) in [0, 1]."""
    candidates = all_specs(world)
    text = F.normalize(clip.text_features([world.make_prompt(*s) for s in candidates]), dim=-1)
    feats = []
    for chunk in images.split(64):
        feats.append(F.normalize(clip.image_features(chunk), dim=-1))
    pred = (torch.cat(feats) @ text.T).argmax(-1).tolist()
    got = [candidates[i] for i in pred]
    n = len(specs)
    return {
        "color": sum(g[0] == s[0] for g, s in zip(got, specs)) / n,
        "shape": sum(g[1] == s[1] for g, s in zip(got, specs)) / n,
        "background": sum(g[2] == s[2] for g, s in zip(got, specs)) / n,
        "prompt": sum(g == s for g, s in zip(got, specs)) / n,
        "n": n,
    }


def held_out(world: World, n: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """n renders cycling through every (colour, shape, background), from a seed not used in training."""
    rng = np.random.default_rng(seed)
    specs = all_specs(world)
    chosen = [specs[i % len(specs)] for i in range(n)]
    images = np.stack([world.render(*s, rng=rng).image for s in chosen])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, chosen


def load_vae(path: str | Path | None):
    if path in (None, "", "none"):
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(resolve_path(path), subfolder="vae").eval()


def evaluate(clip, world: World, vae, n: int, seed: int) -> dict:
    """Zero-shot accuracies on held-out renders, plain and through the VAE (what edits look like)."""
    images, specs = held_out(world, n, seed)
    result = {"renders": zero_shot(clip, world, images, specs)}
    if vae is not None:
        result["vae_roundtrip"] = zero_shot(clip, world, vae_roundtrip(vae, images), specs)
    return result


def train(cfg: DictConfig, make_logger: StageLogger | None = None) -> dict:
    """Train, evaluate and export the toy CLIP. Returns {"output_dir", "eval", "steps", "minutes"}.
    ``cfg``: the ``toy_clip:`` node of configs/experiment/train_toy_clip.yaml (every key);
    ``make_logger(stage, save_dir)``: the Lightning logger (the task passes the configured one)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.seed), verbose=False)
    world = load_world(resolve_path(cfg.grammar))
    tokenizer = build_tokenizer(world)
    if cfg.init_dir:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(resolve_path(cfg.init_dir))
    else:
        model = build_clip(tokenizer, world.image_size, cfg)
    vae = load_vae(cfg.vae_path)
    work = output_path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    module = ClipModule(model, tokenizer, Augment(cfg), cfg)
    pool = roundtrip_pool(world, vae, int(cfg.pool_per_prompt), int(cfg.seed) + 7) if vae is not None else None
    stream = DistinctPromptStream(world, int(cfg.batch), int(cfg.seed), pool, float(cfg.roundtrip_prob))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
    logger = (make_logger("clip", work) if make_logger else None) or False
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=int(cfg.steps),
                        max_time={"seconds": max(1, int(60 * float(cfg.budget_minutes)))},
                        logger=logger, log_every_n_steps=int(cfg.progress_every),
                        callbacks=[TQDMProgressBar(refresh_rate=int(cfg.progress_every))],
                        enable_checkpointing=False, num_sanity_val_steps=0)
    t0 = time.time()
    fit_quietly(trainer, module, loader)
    minutes = (time.time() - t0) / 60
    finish_training_logger(trainer)
    model.eval()
    scores = evaluate(ClipMetrics(model, tokenizer), world, vae, int(cfg.eval_renders), int(cfg.seed) + 999)
    out = output_path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {"what": "toy-world CLIP (toyworld/clip.py)", "steps": int(trainer.global_step),
            "minutes": round(minutes, 1), "zero_shot": scores,
            "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write_text(out / "toy_clip.json", json.dumps(meta, indent=1))
    print(json.dumps({"output_dir": str(out), "steps": meta["steps"], "zero_shot": scores}, indent=1))
    return {"output_dir": str(out), "eval": scores, "steps": meta["steps"], "minutes": minutes}
