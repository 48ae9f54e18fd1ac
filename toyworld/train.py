"""Train the toy latent-diffusion model: stage 1 AutoencoderKL, stage 2 UNet + text encoder.

Lightning does the loop (progress bar, checkpoints, W&B offline / CSV logging, wall-clock budget).
The result is a diffusers ``StableDiffusionPipeline`` folder (``output_dir``, e.g. ``models/toy``).

    python -m experiments.run experiment=train_toy [toy.budget_minutes=75 toy.output_dir=...]

or from Python: ``toyworld.train.train(cfg)`` with the ``toy:`` node of configs/experiment/train_toy.yaml,
the only place the settings and their defaults are written.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from sdattn.hooks import AttentionHook, HookSet
from sdattn.layers import enumerate_layers
from sdattn.maps import probabilities
from sdattn.settings import SETTINGS_FILE
from toyworld.model import (
    assemble_pipeline,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    clip_text_tower,
    extend_context,
    load_pipeline,
    save_pipeline,
)
from toyworld.world import REPO_ROOT, load_world

TOY_SETTINGS = REPO_ROOT / "models" / "toy" / SETTINGS_FILE  # the toy model's settings (steps, layers, ...)


def resolve_path(path: str | Path) -> Path:
    """An input of the training configs: a relative path found under the working folder, else under the
    project (the shipped ``models/toy``, ``datasets/...``, also from an installed package)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def output_path(path: str | Path) -> Path:
    """An output of the training configs: relative to the working folder, never into the package."""
    return Path(path).absolute()


# --------------------------------------------------------------------------- data
class RenderStream(torch.utils.data.IterableDataset):
    """Endless seeded stream of rendered batches: (images in [-1, 1], prompts)."""

    def __init__(self, world, batch: int, seed: int):
        self.world, self.batch, self.seed = world, batch, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            imgs, prompts = self.world.render_batch(rng, self.batch)
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            yield x, prompts


def _loader(world, batch, seed):
    return torch.utils.data.DataLoader(RenderStream(world, batch, seed), batch_size=None, num_workers=0)


class StepBudget:
    """Training progress in [0, 1]: the larger of the step and the wall-clock fractions."""

    def __init__(self, max_steps: int, max_seconds: float):
        self.max_steps, self.max_seconds, self.t0 = max_steps, max_seconds, None

    def __call__(self, step: int) -> float:
        if self.t0 is None:
            self.t0 = time.time()
        return min(1.0, max(step / self.max_steps, (time.time() - self.t0) / max(self.max_seconds, 1.0)))


def cosine_lr(base: float, step: int, progress: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- stage 1: VAE
class VAEModule(L.LightningModule):
    def __init__(self, vae, lr: float, kl_weight: float, progress: StepBudget, warmup: int = 100,
                 crop: int = 0, seed: int = 0):
        super().__init__()
        self.vae, self.lr, self.kl_weight, self.progress, self.warmup = vae, lr, kl_weight, progress, warmup
        self.crop, self.rng = crop, np.random.default_rng(seed + 7)

    def _random_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Random crops (the VAE is fully convolutional): cheaper steps, same local statistics."""
        c, n = self.crop, x.shape[-1]
        if not c or c >= n:
            return x
        off = self.rng.integers(0, n - c + 1, size=(x.shape[0], 2))
        return torch.stack([xi[:, a:a + c, b:b + c] for xi, (a, b) in zip(x, off)])

    def training_step(self, batch, _):
        x, _prompts = batch
        x = self._random_crop(x)
        lr = cosine_lr(self.lr, self.global_step, self.progress(self.global_step), self.warmup)
        for g in self.optimizers().optimizer.param_groups:
            g["lr"] = lr
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        l2 = F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = l1 + l2 + self.kl_weight * kl
        self.log_dict({"vae/loss": loss, "vae/l1": l1, "vae/mse": l2, "vae/kl": kl, "vae/lr": lr},
                      prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)


# --------------------------------------------------------------------------- stage 2: UNet
class PromptEncoder:
    """Tokenise prompts padded to the tokenizer's max length (as the SD pipeline does), with a cache."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def ids(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            if p not in self.cache:
                self.cache[p] = self.tokenizer(p, padding="max_length", max_length=self.tokenizer.model_max_length,
                                               truncation=True, return_tensors="pt").input_ids[0]
            out.append(self.cache[p])
        return torch.stack(out)


PADDING_SOURCES = ("empty", "other")  # toy.unet.padding_source


def content_free_padding(cond: torch.Tensor, ids: torch.Tensor, empty: torch.Tensor, end_id: int,
                         chosen: torch.Tensor, with_end: bool = False) -> torch.Tensor:
    """``cond`` (B, L, D) with the padding of the ``chosen`` (B,) bool rows — every position after the first
    ``end_id`` of ``ids`` (B, L), and that end token itself when ``with_end`` — taken from ``empty`` (L, D),
    the empty prompt's encoding. A causal text encoder writes the whole prompt into its end token and padding,
    so a UNet can read the prompt there instead of from its words (docs/toy_world.md, issue 25); with them
    content-free in some images, it cannot rely on them."""
    _, swap = padding_positions(ids, end_id, chosen, with_end)
    return torch.where(swap, empty[None].to(cond.dtype), cond)


def padding_positions(ids: torch.Tensor, end_id: int, chosen: torch.Tensor, with_end: bool):
    """Where ``content_free_padding`` / ``other_prompt_padding`` replace: the first replaced position of each
    row of ``ids`` (B, L) (after its first ``end_id``; the end token itself when ``with_end``) → (B,), and the
    replaced positions of the ``chosen`` (B,) rows → (B, L, 1) bool."""
    first = (ids == end_id).int().argmax(1) + 1 - int(with_end)  # (B,)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, L)
    return first, ((pos >= first[:, None]) & chosen[:, None].to(ids.device))[..., None]


def other_prompt_padding(cond: torch.Tensor, ids: torch.Tensor, end_id: int, chosen: torch.Tensor,
                         with_end: bool = False) -> torch.Tensor:
    """``cond`` (B, L, D) with the padding of the ``chosen`` (B,) bool rows (every position after the first
    ``end_id`` of ``ids`` (B, L), and that end token itself when ``with_end``) taken from the next row's prompt
    (row i + 1, cyclically), aligned at that prompt's own end token. Unlike ``content_free_padding`` the
    padding still looks like a prompt's padding, but it holds another prompt: reading the prompt there is
    penalised, so the UNet learns to read it from the words (issue 25)."""
    b, length = ids.shape
    first, swap = padding_positions(ids, end_id, chosen, with_end)  # (B,), (B, L, 1)
    donor = torch.roll(torch.arange(b, device=ids.device), -1)  # (B,) row i takes row i + 1's padding
    pos = torch.arange(length, device=ids.device)[None]  # (1, L)
    src = (first[donor][:, None] + pos - first[:, None]).clamp(0, length - 1)  # (B, L) donor position
    return torch.where(swap, cond[donor[:, None], src], cond)


class StartShareHook(AttentionHook):
    """A cross-attention layer computed explicitly (softmax(q·kᵀ·scale)·v, what SDPA computes) that keeps,
    with its gradient, the squared distance of the start token's share (per image and head, mean over the
    queries) from ``target`` (the start-token sink loss: SD 1.x puts 0.9–0.99 of every cross-attention map
    on its start token). Two-sided: a share pushed to 1 leaves no attention for the prompt, and a saturated
    softmax gives the diffusion loss no gradient to bring it back."""

    def __init__(self, layer, state, deviations: list, target: float):
        super().__init__(layer, state)
        self.deviations, self.target = deviations, target

    def attend(self, attn, query, key, value, mask):
        probs = probabilities(query, key, attn.scale, mask)  # (B, H, Nq, L)
        self.deviations.append((probs[..., 0].mean(-1) - self.target).pow(2).mean())
        return probs @ value  # (B, H, Nq, d)


def sink_hooks(unet, target: float, deviations: list) -> HookSet:
    """:class:`StartShareHook` on every cross layer of ``unet`` (installed while the HookSet is entered)."""
    cross = [x for x in enumerate_layers(unet) if x.kind == "cross"]
    return HookSet(unet, cross, lambda layer, state: StartShareHook(layer, state, deviations, target))


class DiffusionModule(L.LightningModule):
    def __init__(self, unet, text_encoder, vae, tokenizer, scaling_factor: float, ucfg, progress: StepBudget,
                 seed: int):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.vae = vae.eval().requires_grad_(False)
        self.prompts = PromptEncoder(tokenizer)
        self.scaling_factor = scaling_factor
        self.ucfg, self.progress = ucfg, progress
        self.scheduler = build_scheduler()
        ac = self.scheduler.alphas_cumprod.float()
        self.register_buffer("alphas_cumprod", ac, persistent=False)
        self.train_text = any(p.requires_grad for p in text_encoder.parameters())  # False: frozen, as SD's CLIP
        self.ema_unet = copy.deepcopy(unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(text_encoder).requires_grad_(False) if self.train_text else text_encoder
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.sink_deviations: list = []  # filled by sink_hooks during the UNet's forward (ucfg.sink_weight > 0)
        self.padding_source = ucfg.get("padding_source", "empty")  # checked here, not at the first step
        if self.padding_source not in PADDING_SOURCES:
            raise ValueError(f"toy.unet.padding_source={self.padding_source!r}: allowed are {list(PADDING_SOURCES)}")

    def training_step(self, batch, _):
        x, prompts = batch
        step = self.global_step
        lr = cosine_lr(self.ucfg.lr, step, self.progress(step), self.ucfg.warmup)
        for g in self.optimizers().optimizer.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            z0 = self.vae.encode(x).latent_dist.sample(generator=self.gen) * self.scaling_factor
        drop = torch.rand(len(prompts), generator=self.gen) < self.ucfg.cfg_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        ids = self.prompts.ids(prompts)
        b = z0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=self.gen)
        noise = torch.randn(z0.shape, generator=self.gen)
        if self.ucfg.get("offset_noise", 0.0):
            # offset noise: a per-image, per-channel constant in the noise, so that the spatial mean
            # of a very noisy latent stops leaking the image's flat background / object colour
            # (otherwise samples follow the starting noise's mean instead of the prompt).
            noise = noise + float(self.ucfg.offset_noise) * torch.randn((b, z0.shape[1], 1, 1), generator=self.gen)
        a = self.alphas_cumprod[t].view(b, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        if self.train_text:
            cond = self.text_encoder(ids)[0]
        else:
            with torch.no_grad():
                cond = self.text_encoder(ids)[0]
        if self.ucfg.get("padding_dropout", 0.0):
            chosen = torch.rand(b, generator=self.gen) < float(self.ucfg.padding_dropout)
            end_id, with_end = self.prompts.tokenizer.eos_token_id, bool(self.ucfg.get("padding_dropout_end", False))
            if self.padding_source == "other":
                cond = other_prompt_padding(cond, ids, end_id, chosen, with_end)
            else:
                with torch.no_grad():
                    empty = self.text_encoder(self.prompts.ids([""]))[0][0]  # (L, D)
                cond = content_free_padding(cond, ids, empty, end_id, chosen, with_end)
        self.sink_deviations.clear()
        pred = self.unet(zt, t, cond).sample
        snr = a.view(b) / (1 - a.view(b))
        w = torch.clamp(snr, max=self.ucfg.min_snr_gamma) / snr  # min-SNR-gamma, epsilon target
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (w * per).mean()
        logs = {"unet/loss": loss, "unet/mse": per.mean(), "unet/lr": lr}
        if self.sink_deviations:  # the start-token sink loss (mean over cross layers)
            sink = torch.stack(self.sink_deviations).mean()
            loss = loss + float(self.ucfg.sink_weight) * sink
            logs["unet/sink_deviation"] = sink
        self.log_dict(logs, prog_bar=True, on_step=True)
        return loss

    def on_train_batch_end(self, *args):
        s = self.global_step
        d = min(self.ucfg.ema_decay, (1 + s) / (10 + s))
        with torch.no_grad():
            pairs = [(self.ema_unet, self.unet)] + ([(self.ema_text, self.text_encoder)] if self.train_text else [])
            for ema, live in pairs:  # trained parameters only: frozen ones stay bit-identical
                ep, lp = zip(*[(e, p) for e, p in zip(ema.parameters(), live.parameters()) if p.requires_grad])
                ep, lp = list(ep), list(lp)
                torch._foreach_mul_(ep, d)
                torch._foreach_add_(ep, lp, alpha=1 - d)

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        params += list(self.text_encoder.parameters()) if self.train_text else []
        return torch.optim.AdamW(params, lr=self.ucfg.lr, weight_decay=self.ucfg.weight_decay)


class ExportCallback(Callback):
    """Every few minutes (and at the end) write the EMA pipeline to work_dir/pipelines/step_N."""

    def __init__(self, export_fn, every_minutes: float):
        self.export_fn, self.every, self.last = export_fn, every_minutes * 60, time.time()

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.every > 0 and time.time() - self.last >= self.every:
            self.export_fn(trainer.global_step)
            self.last = time.time()


# --------------------------------------------------------------------------- driver
StageLogger = Callable[[str, Path], object]  # (stage, save dir) → a Lightning logger, or None for none


# Lightning's own notices that say nothing about our run: its pytree code on newer torch (LeafSpec), and the
# frozen modules (VAE, text tower) that are in eval mode on purpose.
_LIGHTNING_NOISE = (r".*isinstance\(treespec, LeafSpec\).*", r"Found \d+ module\(s\) in eval mode.*")


def fit_quietly(trainer, module, loader) -> None:
    """``trainer.fit(module, loader)`` without the Lightning notices in ``_LIGHTNING_NOISE``."""
    with warnings.catch_warnings():
        for message in _LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, loader)


def finish_training_logger(trainer) -> None:
    try:
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(trainer.logger, WandbLogger):
            import wandb

            wandb.finish()
    except Exception:  # pragma: no cover
        pass


def _trainer(cfg, work: Path, stage: str, max_steps: int, seconds: float, callbacks: list,
             make_logger: StageLogger | None):
    ckpt = ModelCheckpoint(dirpath=str(work / "checkpoints" / stage), save_last=True,
                           every_n_train_steps=500, save_top_k=-1)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_time={"seconds": max(1, int(seconds))},
        logger=(make_logger(stage, work) if make_logger else None) or False, enable_progress_bar=True,
        callbacks=[ckpt, TQDMProgressBar(refresh_rate=int(cfg.progress_every)), *callbacks],
        log_every_n_steps=cfg.progress_every, num_sanity_val_steps=0, enable_model_summary=True,
        deterministic=False,
    )


@torch.no_grad()
def latent_std(vae, world, batches: int, batch: int, seed: int) -> tuple[float, list[float]]:
    rng = np.random.default_rng(seed + 12345)
    g = torch.Generator().manual_seed(seed)
    zs = []
    for _ in range(batches):
        imgs, _ = world.render_batch(rng, batch)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        zs.append(vae.encode(x).latent_dist.sample(generator=g))
    z = torch.cat(zs)
    return float(z.std()), z.mean(dim=(0, 2, 3)).tolist()


def train(cfg: DictConfig, make_logger: StageLogger | None = None) -> dict:
    """Train both stages and write the pipeline to ``cfg.output_dir``; returns a summary dict.
    ``cfg``: the ``toy:`` node of configs/experiment/train_toy.yaml (every key); ``make_logger(stage,
    save_dir)``: each stage's Lightning logger (the task passes the configured one; None: no logging)."""
    torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    t_start = time.time()
    world = load_world(resolve_path(cfg.grammar))
    if world.image_size != cfg.image_size:
        raise ValueError(f"image_size {cfg.image_size} != grammar image_size {world.image_size}")
    work = output_path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = output_path(cfg.output_dir)
    budget = float(cfg.budget_minutes) * 60

    factor = 2 ** (len(cfg.vae.channels) - 1)
    latent_size = cfg.image_size // factor
    if cfg.get("init_pipeline"):
        return _continue_stage2(cfg, world, work, out_dir, budget, t_start, factor, latent_size, make_logger)
    tokenizer = build_tokenizer(world, int(cfg.text.max_length))
    vae = build_vae(cfg.image_size, list(cfg.vae.channels), cfg.vae.latent_channels, bool(cfg.vae.mid_attention))

    # ---- stage 1: VAE
    vae_seconds = budget * float(cfg.vae.budget_fraction)
    vae_mod = VAEModule(vae, cfg.vae.lr, cfg.vae.kl_weight, StepBudget(cfg.vae.steps, vae_seconds),
                        crop=int(cfg.vae.crop), seed=int(cfg.seed))
    tr = _trainer(cfg, work, "vae", int(cfg.vae.steps), vae_seconds, [], make_logger)
    fit_quietly(tr, vae_mod, _loader(world, int(cfg.vae.batch), int(cfg.seed)))
    vae_steps = int(tr.global_step)
    finish_training_logger(tr)
    vae.eval().requires_grad_(False)
    std, means = latent_std(vae, world, int(cfg.vae.scale_batches), 32, int(cfg.seed))
    scaling = 1.0 / std
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        rng = np.random.default_rng(cfg.seed + 999)
        imgs, _ = world.render_batch(rng, 64)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        vae_rec_err = float(((rec - x).abs() * 127.5).mean())  # mean abs error in 0..255 units
    print(f"[toyworld] VAE: {vae_steps} steps, latent std {std:.4f} (scaling_factor {scaling:.4f}), "
          f"channel means {[round(m, 3) for m in means]}, recon MAE {vae_rec_err:.2f}/255", flush=True)
    t_vae = time.time() - t_start

    # ---- stage 2: UNet + text encoder in latent space
    text_encoder = text_encoder_for(cfg, build_text_encoder(tokenizer, cfg.text.hidden, cfg.text.layers,
                                                            cfg.text.heads), tokenizer)
    unet = new_unet(cfg.unet, latent_size, int(cfg.vae.latent_channels))
    info = {"vae_steps": vae_steps, "vae_recon_mae_255": vae_rec_err}
    return _stage2(cfg, world, work, out_dir, budget, t_start, factor, latent_size, vae, unet, text_encoder,
                   tokenizer, scaling, info, {"vae_minutes": round(t_vae / 60, 2)}, make_logger)


def _continue_stage2(cfg, world, work, out_dir, budget, t_start, factor, latent_size, make_logger) -> dict:
    """Stage 2 only, initialised from an exported pipeline (its VAE, tokenizer, EMA UNet/text; with
    ``toy.unet.from_scratch`` a fresh UNet instead of its UNet)."""
    src = resolve_path(cfg.init_pipeline)
    pipe = load_pipeline(src)
    prev = json.loads((src / "toy_model.json").read_text()) if (src / "toy_model.json").exists() else {}
    vae = pipe.vae.eval().requires_grad_(False)
    info = {"init_pipeline": str(cfg.init_pipeline), "init_unet_steps": prev.get("unet_steps"),
            "vae_steps": prev.get("vae_steps"), "vae_recon_mae_255": prev.get("vae_recon_mae_255"),
            "lineage": training_lineage(prev), "decoder_finetune": prev.get("decoder_finetune")}
    if cfg.unet.get("from_scratch"):
        info["init_unet_steps"] = 0
    unet = freeze_parameters(stage2_unet(cfg.unet, pipe, latent_size).train().requires_grad_(True),
                             list(cfg.unet.get("freeze") or []))
    text_encoder = text_encoder_for(cfg, pipe.text_encoder, pipe.tokenizer)
    return _stage2(cfg, world, work, out_dir, budget, t_start, factor, latent_size, vae, unet, text_encoder,
                   pipe.tokenizer, float(vae.config.scaling_factor), info, {}, make_logger)


def training_lineage(meta: dict) -> list[dict]:
    """Every training run behind the pipeline whose ``toy_model.json`` is ``meta``, oldest first, each as
    ``{"config", "unet_steps", "train_minutes"}``: the runs it was continued from (its own ``lineage``; in files
    written before lineages were kept, the one ``previous_config``) and then the run that exported it. A continued
    export stores this, so the whole recipe of a model stays in its folder, not only the last two runs."""
    if not meta:
        return []
    earlier = [dict(run) for run in meta.get("lineage") or []]
    if not earlier and meta.get("previous_config") is not None:
        earlier = [{"config": meta["previous_config"], "unet_steps": meta.get("init_unet_steps"),
                    "train_minutes": None}]
    if meta.get("config") is None:
        return earlier
    return earlier + [{"config": meta["config"], "unet_steps": meta.get("unet_steps"),
                       "train_minutes": meta.get("train_minutes")}]


def stage2_unet(ucfg, pipe, latent_size: int):
    """The UNet a continued stage 2 trains: ``pipe``'s, or with ``toy.unet.from_scratch`` a freshly built one
    (``toy.unet`` sizes, ``pipe``'s latent channels), so the VAE and its decoder fine-tune stay while the UNet
    learns a new recipe from its first step."""
    if not ucfg.get("from_scratch"):
        return pipe.unet
    return new_unet(ucfg, latent_size, int(pipe.vae.config.latent_channels))


def new_unet(ucfg, latent_size: int, latent_channels: int):
    """A freshly initialised UNet of the ``toy.unet`` sizes for ``latent_channels`` × ``latent_size``² latents."""
    return build_unet(latent_size, list(ucfg.channels), ucfg.cross_attention_dim, ucfg.heads, latent_channels)


def freeze_parameters(unet, patterns: list[str]):
    """``unet`` with every parameter whose name contains one of ``patterns`` frozen (e.g. the cross-attention
    queries and keys that hold a start-token sink, ``toyworld.sink``: it stays exact while the rest trains)."""
    for name, p in unet.named_parameters():
        if any(pat in name for pat in patterns):
            p.requires_grad_(False)
    if patterns and all(p.requires_grad for p in unet.parameters()):
        raise ValueError(f"toy.unet.freeze {patterns}: no UNet parameter name contains any of these")
    return unet


def text_encoder_for(cfg, text_encoder, tokenizer):
    """Stage 2's text encoder from ``toy.text``: ``init`` (a CLIP folder whose text tower replaces it, as SD
    conditions on CLIP's), ``max_length`` (the context: longer than the encoder's → :func:`extend_context`,
    and the tokenizer pads to it) and ``freeze`` (SD trains its UNet against a frozen text encoder)."""
    t = cfg.text
    if t.get("init"):
        text_encoder = clip_text_tower(resolve_path(t.init))
    length = int(t.max_length)
    if length != text_encoder.config.max_position_embeddings:
        text_encoder = extend_context(text_encoder, tokenizer, length)
    tokenizer.model_max_length = length
    frozen = bool(t.get("freeze"))
    return text_encoder.train(not frozen).requires_grad_(not frozen)


def settings_source(cfg) -> Path | None:
    """The settings file an export carries: the init pipeline's own, else the shipped toy model's."""
    if cfg.get("init_pipeline"):
        own = resolve_path(cfg.init_pipeline) / SETTINGS_FILE
        if own.is_file():
            return own
    return TOY_SETTINGS if TOY_SETTINGS.is_file() else None


def _stage2(cfg, world, work, out_dir, budget, t_start, factor, latent_size, vae, unet, text_encoder, tokenizer,
            scaling, extra_info, extra_summary, make_logger) -> dict:
    unet_seconds = max(1.0, budget - (time.time() - t_start) - 30)
    dm = DiffusionModule(unet, text_encoder, vae, tokenizer, scaling, cfg.unet,
                         StepBudget(int(cfg.unet.steps), unet_seconds), int(cfg.seed))

    info = {
        "image_size": int(cfg.image_size), "latent_size": latent_size, "vae_scale_factor": factor,
        "scaling_factor": scaling, "guidance_scale": float(cfg.guidance_scale),
        "num_inference_steps": int(cfg.num_inference_steps), "vocabulary": world.vocabulary(),
        "colors": list(world.colors), "shapes": list(world.shapes), "backgrounds": list(world.backgrounds),
        **extra_info, "config": OmegaConf.to_container(cfg),
    }

    settings = settings_source(cfg)
    settings_text = settings.read_text() if settings else None  # read now: the init folder may be overwritten

    def export(step: int, dest: Path | None = None) -> Path:
        dest = dest or work / "pipelines" / f"step_{step:06d}"
        pipe = assemble_pipeline(vae, dm.ema_unet, dm.ema_text, tokenizer)
        save_pipeline(pipe, dest)
        if settings_text is not None:  # the folder runs with the toy model's settings wherever it is loaded
            (dest / SETTINGS_FILE).write_text(settings_text)
        meta = dict(info, unet_steps=int(step), train_minutes=round((time.time() - t_start) / 60, 2))
        (dest / "toy_model.json").write_text(json.dumps(meta, indent=2))
        print(f"[toyworld] exported pipeline at step {step} -> {dest}", flush=True)
        return dest

    tr = _trainer(cfg, work, "unet", int(cfg.unet.steps), unet_seconds,
                  [ExportCallback(export, float(cfg.export_every_minutes))], make_logger)
    sink_weight = float(cfg.unet.get("sink_weight") or 0.0)
    hooks = sink_hooks(unet, float(cfg.unet.sink_target), dm.sink_deviations) if sink_weight > 0 else nullcontext()
    with hooks:  # on the live UNet only (the EMA copy, which is exported, keeps SDPA)
        fit_quietly(tr, dm, _loader(world, int(cfg.unet.batch), int(cfg.seed) + 1))
    unet_steps = int(tr.global_step)
    finish_training_logger(tr)
    export(unet_steps)
    final = export(unet_steps, out_dir)
    total = time.time() - t_start
    summary = {"output_dir": str(final), "vae_steps": extra_info.get("vae_steps"), "unet_steps": unet_steps,
               **extra_summary, "total_minutes": round(total / 60, 2), "scaling_factor": scaling,
               "vae_recon_mae_255": extra_info.get("vae_recon_mae_255")}
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[toyworld] done: {summary}", flush=True)
    return summary
