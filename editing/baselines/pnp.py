"""Plug-and-Play (Tumanyan et al., CVPR 2023) on the shared hook layer and sampler.

Official behaviour (pnp-diffusers): the source is DDIM-inverted with ``""`` in 999 steps (preprocess.py,
every t saved; the sampler loads the 50 it needs); during target sampling
the source branch (prompt ``""``, no guidance) runs alongside the target's CFG rows and, in both
target rows, (a) the residual branch of ``up_blocks[1].resnets[1]`` is replaced by the source's for
the first ``pnp_f_t`` = 0.8 of the steps and (b) self-attention Q, K are replaced by the source's in
the decoder self layers (SD 1.5: self layers 9–16) for the first ``pnp_attn_t`` = 0.5.

Here: ``[source, target]`` sampled together with CFG; both target rows take the source's COND row.
The source cond prompt is ``inversion_prompt`` (default ``""``, official) for real images, whose
source row replays the inversion (:class:`~editing.two_branch.AnchorSource`), and the pair's source prompt
for generated pairs (the source image is generated with it from the same seed as the target). The
negative prompt is the official ``"ugly, blurry, black, low res, unrealistic"`` (config_pnp.yaml), in the
uncond rows of both branches (the source's uncond row changes nothing: real images re-anchor it and
injection reads the source's cond row; a generated source is sampled with it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DDIMInverseScheduler
from safetensors import safe_open
from safetensors.torch import save_file

from sdattn.errors import UserError
from sdattn.files import atomic_save
from sdattn.hooks import BatchLayout
from sdattn.layers import select_layers
from sdattn.sampling import check_prompts, ddim_scheduler, decode, encode_image, encode_prompts, initial_latents
from sdattn.steps import parse_steps

from ..inversion import ddim_invert, tensor_digest
from ..replace import RowInjection
from ..two_branch import SOURCE, TARGET, AnchorSource, Images, model_layers, replacement_edit


def target_rows(layout: BatchLayout) -> list[int]:
    """The target's rows: cond, and uncond with CFG."""
    return [layout.cond_row(TARGET), *([layout.uncond_row(TARGET)] if layout.cfg else [])]


class QKInject(RowInjection):
    """PnP self-attention injection: during ``steps`` both target rows attend with the source COND
    row's query and key: SDPA(q_src, k_src, v_tgt)."""

    def rows(self, layout: BatchLayout) -> list[tuple[int, int]]:
        return [(layout.cond_row(SOURCE), row) for row in target_rows(layout)]


class FeatureInject:
    """PnP residual-feature injection: a forward hook on ``module`` that, during ``steps``, copies the
    source COND row of its output into both target rows. A sampler callback (``on_step_begin`` gives
    the step and batch layout); use :meth:`installed` to register the hook (removed in ``finally``)."""

    def __init__(self, module: torch.nn.Module, steps: set[int]):
        self.module, self.steps = module, steps
        self.step: int | None = None
        self.layout: BatchLayout | None = None

    def on_step_begin(self, step: int, timestep: int, num_steps: int, layout: BatchLayout) -> None:
        self.step, self.layout = step, layout

    def on_step_end(self, step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.step not in self.steps:
            return None
        out = output.clone()  # (B, C, h, w)
        out[target_rows(self.layout)] = output[self.layout.cond_row(SOURCE)]
        return out

    @contextmanager
    def installed(self):
        handle = self.module.register_forward_hook(self)
        try:
            yield self
        finally:
            handle.remove()


def attention_up_blocks(unet) -> list[int]:
    return [i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)]


def pnp_feature_module(pipe, name: str) -> tuple[str, torch.nn.Module]:
    """The resnet whose residual features are injected: ``"auto"`` = ``up_blocks.<i>.resnets.1`` of the
    first up block with attentions (official ``up_blocks[1].resnets[1]``) or an up-block resnet name.
    Returns (resnet name, its ``conv2``): the hook sits on ``conv2``, the residual branch before the skip
    is added, which is where pnp-diffusers swaps the features."""
    unet = pipe.unet
    valid = [f"up_blocks.{i}.resnets.{j}" for i, b in enumerate(unet.up_blocks) for j in range(len(b.resnets))]
    if name == "auto":
        name = f"up_blocks.{attention_up_blocks(unet)[0]}.resnets.1"
    if name not in valid:
        raise UserError(f"method.feature_block {name!r} is not an up-block resnet of this model; "
                        f"allowed: auto, {', '.join(valid)}")
    return name, unet.get_submodule(name).conv2


def pnp_injection(pipe, num_inference_steps: int, *, feature_steps, attn_steps, attn_layers,
                  feature_block: str) -> tuple[dict, FeatureInject]:
    """PnP's hooks, validated: ({self layer: QKInject factory}, the feature hook, not yet installed)."""
    feat_steps = parse_steps(feature_steps, num_inference_steps, "fraction", "method.feature_steps")
    qk_steps = parse_steps(attn_steps, num_inference_steps, "fraction", "method.attn_steps")
    layers = select_layers(model_layers(pipe), attn_layers, "self")  # official "decoder": SD 1.5 self 9–16
    hooks = {x: (lambda lay, st: QKInject(lay, st, qk_steps)) for x in layers}
    _, module = pnp_feature_module(pipe, feature_block)
    return hooks, FeatureInject(module, feat_steps)


def pnp_edit(pipe, source_prompt: str, target_prompt: str, latents: torch.Tensor, num_inference_steps: int,
             guidance_scale: float, injection: tuple[dict, FeatureInject], callbacks: Sequence = (),
             negative_prompt: str = "") -> torch.Tensor:
    """Sample ``[source, target]`` from ``latents`` (1, C, h, w) with ``injection`` (from
    :func:`pnp_injection`) → final latents (2, C, h, w)."""
    hooks, feature = injection
    with feature.installed():
        return replacement_edit(pipe, source_prompt, target_prompt, latents, hooks, num_inference_steps,
                                guidance_scale, negative_prompt=negative_prompt, callbacks=[feature, *callbacks],
                                progress=False)


def sampler_trajectory(pipe, trajectory: Sequence[torch.Tensor], inversion_steps: int,
                       num_inference_steps: int) -> list[torch.Tensor]:
    """The sampler's anchors from an inversion with ``inversion_steps`` steps: [z_0, z at t_{N-1}, ...,
    z at t_0] for the N sampling timesteps t_0 > ... > t_{N-1}, as :class:`AnchorSource` reads them
    (pnp-diffusers saves every inverted t and loads the 50 it samples at). A sampling timestep the
    inversion never reached is a UserError."""
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(inversion_steps)
    level = {int(t): k + 1 for k, t in enumerate(inverse.timesteps)}  # timestep → index in trajectory
    sampler = ddim_scheduler(pipe)
    sampler.set_timesteps(num_inference_steps)
    missing = [int(t) for t in sampler.timesteps if int(t) not in level]
    if missing:
        raise UserError(f"method.inversion_steps {inversion_steps} does not reach the sampling timesteps {missing[:3]} "
                        f"of num_inference_steps {num_inference_steps}; use 999 (official, every t) or "
                        f"{num_inference_steps}")
    return [trajectory[0], *(trajectory[level[int(t)]] for t in reversed(sampler.timesteps))]


def inversion_key(pipe, latents: torch.Tensor, context: torch.Tensor, settings: dict) -> str:
    """Cache key of an inversion: the image latent (image + VAE), the prompt's embedding (prompt + text
    encoder), a fingerprint of the UNet (its input, output and time-embedding weights: what tells SD
    checkpoints apart without hashing 3 GB), its dtype and ``settings``."""
    unet = pipe.unet
    weights = [unet.conv_in.weight, unet.conv_out.weight, *unet.time_embedding.parameters()]
    meta = json.dumps({**settings, "dtype": str(unet.dtype), "scheduler": dict(pipe.scheduler.config)},
                      sort_keys=True, default=str)
    return tensor_digest(latents, context, *weights)[:24] + hashlib.sha256(meta.encode()).hexdigest()[:8]


class PlugAndPlay:
    """Benchmark entry (``configs/method/pnp.yaml``, instantiated with the method's settings):
    ``PlugAndPlay(**settings)(pipe, example, seed, image=None) -> (source, edited)``: residual features
    and decoder self-attention Q, K of the target ← source.

    Real images are inverted with ``inversion_steps`` DDIM steps (official 999: preprocess.py) and the
    anchors the sampler needs are cached in ``inversion_cache/<key>.safetensors`` (``null``: no cache),
    so the long inversion is paid once per image, model and setting. After each call ``info`` says
    whether the inversion came from the cache and what it cost when it was computed:
    ``{"pnp_inversion_cached": bool, "pnp_inversion_s": float}`` (empty for generated pairs)."""

    def __init__(self, *, feature_steps, attn_steps, attn_layers, feature_block: str, inversion_prompt: str,
                 inversion_steps: int, negative_prompt: str, inversion_cache: str | None, num_inference_steps: int,
                 guidance_scale: float):
        self.injection_settings = dict(feature_steps=feature_steps, attn_steps=attn_steps, attn_layers=attn_layers,
                                       feature_block=feature_block)
        self.inversion_prompt, self.negative_prompt = str(inversion_prompt), str(negative_prompt)
        self.inversion_steps = int(inversion_steps)
        if self.inversion_steps < 1:
            raise UserError(f"method.inversion_steps {inversion_steps} must be ≥ 1 (official: 999)")
        self.cache = None if inversion_cache is None else Path(inversion_cache)
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self.info: dict = {}

    def invert(self, pipe, latents: torch.Tensor) -> list[torch.Tensor]:
        """The sampler's anchors for ``latents`` (1, C, h, w), from the cache when there; sets ``info``."""
        settings = {"prompt": self.inversion_prompt, "inversion_steps": self.inversion_steps,
                    "num_inference_steps": self.num_inference_steps}
        path = None
        if self.cache is not None:
            context = encode_prompts(pipe, [self.inversion_prompt])
            path = self.cache / f"{inversion_key(pipe, latents, context, settings)}.safetensors"
            if path.is_file():
                with safe_open(str(path), framework="pt") as f:
                    anchors, seconds = f.get_tensor("anchors"), float(f.metadata()["inversion_s"])
                self.info = {"pnp_inversion_cached": True, "pnp_inversion_s": seconds}
                return list(anchors.to(latents.device).unsqueeze(1))
        t0 = time.perf_counter()
        traj = ddim_invert(pipe, latents, self.inversion_prompt, self.inversion_steps, progress=False)
        anchors = sampler_trajectory(pipe, traj, self.inversion_steps, self.num_inference_steps)
        seconds = time.perf_counter() - t0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            stacked = torch.cat(anchors).float().cpu().contiguous()  # (N + 1, C, h, w)
            atomic_save(path, lambda tmp: save_file({"anchors": stacked}, str(tmp),
                                                    metadata={"inversion_s": repr(seconds), **{
                                                        k: str(v) for k, v in settings.items()}}))
        self.info = {"pnp_inversion_cached": False, "pnp_inversion_s": seconds}
        return anchors

    def __call__(self, pipe, example, seed: int, image: torch.Tensor | None = None) -> Images:
        steps, guidance = self.num_inference_steps, self.guidance_scale
        injection = pnp_injection(pipe, steps, **self.injection_settings)
        src, tgt = example.source_prompt, example.target_prompt
        self.info = {}
        if image is None:
            out = pnp_edit(pipe, src, tgt, initial_latents(pipe, [seed]), steps, guidance, injection,
                           negative_prompt=self.negative_prompt)
            images = decode(pipe, out)
            return images[:1], images[1:]
        inv_prompt = self.inversion_prompt
        check_prompts(pipe.tokenizer, [inv_prompt, tgt, self.negative_prompt])
        anchors = self.invert(pipe, encode_image(pipe, image))
        out = pnp_edit(pipe, inv_prompt, tgt, anchors[-1], steps, guidance, injection,
                       callbacks=[AnchorSource(anchors)], negative_prompt=self.negative_prompt)
        return image, decode(pipe, out[1:])
