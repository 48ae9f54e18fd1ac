"""The attention explorer's one door to the library: every model call of the page goes through here.

The page (:mod:`experiments.app.ui`) sees plain data — numpy images, lists, dicts — and never imports
``probing`` / ``editing`` / ``sdattn`` itself. Two seams are meant to be re-pointed when the library grows:

- :meth:`Backend.record` records the maps with the attention recorder (:class:`sdattn.recorder.Recorder`):
  every word's cross-attention map per layer, step and head, and one self layer's full map.
- :meth:`Backend.edit` runs any editors of ``configs/method/`` on one pair through the library's edit API:
  :func:`experiments.common.method_config` (composed as ``method=<name>`` on this run),
  :mod:`editing.methods` (settings merged, built, run and timed) and :mod:`evaluation.compare` (inversions
  shared, CLIP scores), as ``task=edit`` does for several methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from editing.images import load_image
from editing.inversion import image_size, shared_inversions
from editing.methods import Pair, build_method, method_settings, run_method, with_settings
from evaluation.compare import comparison_rows
from evaluation.metric_models import load_clip
from experiments.cli import CONFIG_DIR, PROJECT_ROOT, register_resolvers, settings_line
from experiments.common import load_model, method_config, plain
from experiments.validate import validate
from probing.attention_maps import prompt_words, top_components
from probing.capture import token_weights
from sdattn.errors import UserError, first_line
from sdattn.hooks import BatchLayout
from sdattn.layers import LayerId, enumerate_layers
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import check_prompts, latent_size, sample

__all__ = ["Backend", "EditOutcome", "Recording", "UserError", "first_line"]

Progress = Callable[[float, str], None]  # (fraction done, what) → None


@dataclass
class Recording:
    """One generated image and the maps recorded while it was sampled."""

    prompt: str
    seed: int
    words: list[str]
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    cross: dict[int, torch.Tensor]  # cross layer index → (S, heads, T, h, w) float16, every step
    self_layer: int  # the self layer whose map is kept
    self_map: torch.Tensor  # (N, N) float32: rows are queries (sum to 1), mean over the chosen steps
    self_grid: tuple[int, int]  # (h, w) of that layer's query grid


@dataclass
class EditOutcome:
    """An edit of one pair by several methods, with the plain target sample."""

    plain: np.ndarray  # (H, W, 3): the target prompt sampled alone (same seed)
    plain_note: str  # how the plain target relates to the source ("same noise" or "same seed")
    rows: list[dict] = field(default_factory=list)  # method, error, and when edited: source, edited, time_s,
    # shared_inversion_s, clip_score, clip_directional, same_source (evaluation.compare.comparison_rows)
    clip_note: str = ""  # why CLIP scores are missing, if they are
    plain_clip_score: float | None = None  # CLIP score of the plain target with the target prompt


class StepProgress:
    """A sampler callback that reports the step to ``report``."""

    def __init__(self, report: Progress | None, what: str):
        self.report, self.what = report, what

    def on_step_begin(self, step: int, timestep: int, num_steps: int, layout: BatchLayout) -> None:
        if self.report is not None:
            self.report(step / num_steps, f"{self.what}: step {step + 1}/{num_steps}")

    def on_step_end(self, step: int, timestep: int, latents: torch.Tensor) -> None:
        return None


def compose_run(overrides: Sequence[str]) -> DictConfig:
    """The run config of ``overrides`` (as ``python -m experiments.run`` composes it), inside or outside a
    Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    if GlobalHydra.instance().is_initialized():
        return compose("run", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("run", overrides=overrides)


def to_numpy_image(images: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] → (H, W, 3) float32."""
    return images[0].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def step_set(lo: int, hi: int, num_steps: int, what: str) -> list[int]:
    """0-based steps ``lo..hi`` (inclusive), checked against the sampling steps."""
    lo, hi = int(lo), int(hi)
    if not 0 <= lo <= hi < num_steps:
        raise UserError(f"{what} steps {lo}..{hi}: allowed 0 ≤ from ≤ to ≤ {num_steps - 1}")
    return list(range(lo, hi + 1))


class Backend:
    """The configured model (``cfg.model``, ``cfg.device``, ``cfg.dtype``) and what the page asks of it."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.settings = plain(cfg.app)
        self.pipe = load_model(cfg)
        self.layers = enumerate_layers(self.pipe.unet, latent_size(self.pipe))
        self.heads = {x.name: int(self.pipe.unet.get_submodule(x.module_name).heads) for x in self.layers}
        self.num_steps, self.guidance = int(cfg.model.steps), float(cfg.model.guidance_scale)
        self._method_specs: dict[str, dict] = {}
        self._clip, self._clip_note = None, None
        self._plain: dict[tuple[str, int], torch.Tensor] = {}  # (target prompt, seed) → plain sample, the last few

    # ---------------------------------------------------------------------------- the model
    def describe(self) -> str:
        """The run's settings line (as the CLI prints it first), paths inside the project shown relative."""
        return settings_line(self.cfg).replace(f"{PROJECT_ROOT}/", "")

    def layer_table(self) -> list[list]:
        """Rows (kind, index, block, query grid, heads, diffusers processor) in the model's own numbering."""
        return [[x.kind, x.index, x.block, f"{x.height}×{x.width}", self.heads[x.name], x.name] for x in self.layers]

    def layer_choices(self, kind: str) -> list[tuple[str, int]]:
        """(label, index) of the ``kind`` layers, e.g. ("6 · up.2 · 16×16", 6)."""
        return [(f"{x.index} · {x.block} · {x.height}×{x.width}", x.index) for x in self.layers if x.kind == kind]

    def layer(self, kind: str, index) -> LayerId:
        """The ``kind`` layer with 1-based ``index`` (the model's own numbering)."""
        mine = [x for x in self.layers if x.kind == kind]
        try:
            i = int(index)
        except (TypeError, ValueError):
            i = 0
        if not 1 <= i <= len(mine):
            raise UserError(f"{kind} layer {index!r} is not a layer of this model: allowed 1..{len(mine)}")
        return mine[i - 1]

    def head_count(self, kind: str, indices: Sequence[int] = ()) -> int:
        """The smallest head count among the chosen ``kind`` layers (all of them when none is chosen)."""
        chosen = [self.layer(kind, i) for i in indices] or [x for x in self.layers if x.kind == kind]
        return min(self.heads[x.name] for x in chosen)

    # ---------------------------------------------------------------------------- maps
    def record(self, prompt: str, seed: int, self_layer: int, self_steps: tuple[int, int] | None = None,
               self_head: int | None = None, progress: Progress | None = None,
               cross_from: Recording | None = None) -> Recording:
        """Sample ``prompt`` from ``seed`` once, recording every word's cross map (each layer, step and head)
        and the self map of ``self_layer`` (mean over ``self_steps``, one head or the mean). ``cross_from``: a
        recording of the same prompt and seed whose image and cross maps are kept (only the self map is new)."""
        prompt, seed = str(prompt or "").strip(), self.seed(seed)
        if cross_from is not None and (cross_from.prompt, cross_from.seed) != (prompt, seed):
            cross_from = None
        if not prompt:
            raise UserError("the prompt is empty: type a prompt, e.g. " + repr(self.settings["prompt"]))
        check_prompts(self.pipe.tokenizer, [prompt])
        words = prompt_words(prompt)
        weights = token_weights(self.pipe.tokenizer, [prompt], [words])  # (1, T, L)
        layer = self.layer("self", self_layer)
        steps = step_set(*(self_steps or (0, self.num_steps - 1)), self.num_steps, "self-attention")
        head = self.check_head(self_head, self.heads[layer.name], f"self layer {layer.index}")
        cross_layers = [] if cross_from else [x for x in self.layers if x.kind == "cross"]
        taps = [Tap([layer], "probs", name="self", steps=steps, rows="cond", heads="mean" if head is None else head,
                    float32=True, over_steps="mean")]
        if cross_layers:  # every word's map on every cross layer, step and head
            taps.append(Tap(cross_layers, "probs", name="cross", rows="cond", heads="all", tokens=weights,
                            float32=True, over_steps="each"))
        rec = Recorder(taps)
        with rec.installed(self.pipe.unet):
            out = sample(self.pipe, [prompt], [seed], num_inference_steps=self.num_steps,
                         guidance_scale=self.guidance, callbacks=[rec, StepProgress(progress, "sampling")],
                         progress=False, decode_images=cross_from is None)
        if cross_from is not None:
            image, cross = cross_from.image, cross_from.cross
        else:
            image, cross, recorded = to_numpy_image(out.images), {}, rec["cross"]
            side = int(self.settings["max_map_side"])
            for x in cross_layers:
                maps = recorded[x.label][:, 0].unflatten(-1, (x.height, x.width)).flatten(0, 2)  # (S·H·T, h, w)
                if max(x.height, x.width) > side:
                    maps = F.adaptive_avg_pool2d(maps, (min(x.height, side), min(x.width, side)))
                cross[x.index] = maps.reshape(-1, self.heads[x.name], len(words), *maps.shape[-2:]).half()
        return Recording(prompt, seed, words, image, cross, layer.index, rec["self"][layer.label][0],
                         (layer.height, layer.width))

    def cross_maps(self, rec: Recording, layers: Sequence[int], steps: tuple[int, int],
                   head: int | None = None) -> np.ndarray:
        """(T, h, w) float32: each word's map averaged over ``layers`` (resized bilinearly to the largest
        grid among them), the steps ``steps[0]..steps[1]`` and one head (or the mean over heads)."""
        if not layers:
            raise UserError("no cross layer chosen: pick at least one")
        chosen = [self.layer("cross", i) for i in layers]
        idx = step_set(*steps, self.num_steps, "cross-attention")
        head = self.check_head(head, self.head_count("cross", [x.index for x in chosen]), "the chosen cross layers")
        maps = [rec.cross[x.index][idx].float().mean(0) for x in chosen]  # each (H, T, h, w)
        maps = [m.mean(0) if head is None else m[head] for m in maps]  # each (T, h, w)
        size = max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])
        maps = [m if tuple(m.shape[-2:]) == size else
                F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0] for m in maps]
        return torch.stack(maps).mean(0).numpy()

    def self_components(self, rec: Recording, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-``k`` left singular vectors of the recorded self map as (k, h, w), and their singular values."""
        comps, sigma = top_components(rec.self_map, rec.self_grid, int(k))
        return comps.numpy(), sigma.numpy()

    def pixel_map(self, rec: Recording, x: float, y: float) -> np.ndarray:
        """(h, w): what the query at image position (``x``, ``y``) — fractions of the width and height in
        [0, 1] — attends to in the recorded self map."""
        if not (0 <= float(x) <= 1 and 0 <= float(y) <= 1):
            raise UserError(f"pixel ({x}, {y}) is outside the image: give fractions of its width and height in [0, 1]")
        h, w = rec.self_grid
        row, col = min(int(float(y) * h), h - 1), min(int(float(x) * w), w - 1)
        return rec.self_map[row * w + col].reshape(h, w).numpy()

    @staticmethod
    def check_head(head, heads: int, where: str) -> int | None:
        """None (the mean over heads) or a head index in 0..heads-1."""
        if head is None or str(head).strip().lower() in ("", "mean"):
            return None
        try:
            h = int(head)
        except (TypeError, ValueError):
            h = -1
        if not 0 <= h < heads:
            raise UserError(f"head {head!r} is not a head of {where}: allowed 'mean' or 0..{heads - 1}")
        return h

    @staticmethod
    def seed(value) -> int:
        try:
            s = int(value)
        except (TypeError, ValueError):
            s = -1
        if s < 0 or s != float(value):
            raise UserError(f"seed {value!r} is not a seed: allowed an integer ≥ 0")
        return s

    # ---------------------------------------------------------------------------- editing
    def methods(self) -> list[str]:
        """The editors of ``configs/method/`` (one YAML each)."""
        return sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))

    def method_spec(self, name: str, settings: dict | None = None) -> dict:
        """``configs/method/<name>.yaml`` as this run composes it (:func:`experiments.common.method_config`),
        with ``settings`` merged in and checked by the CLI's own rules (fractions, step counts, guidance)."""
        if name not in self.methods():
            raise UserError(f"method {name!r} is not one of {self.methods()}")
        if name not in self._method_specs:  # composed and resolved once: the settings follow the model
            self._method_specs[name] = method_config(self.cfg, name)
        spec = with_settings(self._method_specs[name], settings)
        unknown = sorted(set(settings or {}) - set(self.method_settings(name)))
        if unknown:
            raise UserError(f"{unknown[0]!r} is not a setting of method {name!r}; settings: "
                            f"{', '.join(self.method_settings(name))}")
        # as task=edit, the task that reads the method group (its schema: fractions, step counts, guidance)
        validate(OmegaConf.create({"task": "edit", "dtype": self.cfg.dtype, "device": self.cfg.device,
                                   "resize": self.cfg.resize, "method": spec}))
        return spec

    def method_settings(self, name: str) -> dict:
        """The settings of ``configs/method/<name>.yaml`` on this model, resolved (without its name)."""
        if name not in self._method_specs:
            self.method_spec(name)
        settings = method_settings(self._method_specs[name])
        settings.pop("name", None)
        return settings

    def clip(self):
        """The CLIP of ``app.clip`` (loaded once), or None with the reason in ``clip_note``."""
        if self._clip is None and self._clip_note is None:
            try:
                self._clip = load_clip(self.settings["clip"], device=self.cfg.device)
            except (UserError, OSError) as e:
                self._clip_note = f"CLIP scores unavailable: {first_line(e)}"
        return self._clip

    def edit(self, source_prompt: str, target_prompt: str, seed, methods: dict[str, dict],
             image_path: str | None = None, progress: Progress | None = None) -> EditOutcome:
        """Edit one pair with each of ``methods`` ({name: setting overrides}): every method's
        (source, edited) with its time and CLIP scores, and the target prompt sampled alone from ``seed``.
        Bad input (a prompt outside the vocabulary, an unreadable image, an unknown setting) raises before
        anything runs; a method that fails on this pair gets its one-line error in its row."""
        source_prompt, target_prompt = str(source_prompt or "").strip(), str(target_prompt or "").strip()
        seed = self.seed(seed)
        if not target_prompt:
            raise UserError("the target prompt is empty: type what the image should become")
        if not methods:
            raise UserError(f"no method chosen: tick at least one of {self.methods()}")
        if image_path is None and not source_prompt:
            raise UserError("give a source prompt, or upload an image to edit")
        check_prompts(self.pipe.tokenizer, [p for p in (source_prompt, target_prompt) if p])
        image = None
        if image_path is not None:
            try:
                image = load_image(image_path, image_size(self.pipe), str(self.cfg.resize))  # (1, 3, H, W)
            except UserError as e:  # name the upload, not its temporary path
                raise UserError(str(e).replace(repr(str(image_path)), repr(Path(image_path).name))) from None
        editors = {name: build_method(self.method_spec(name, settings))[1] for name, settings in methods.items()}
        clip = self.clip()
        report = progress or (lambda fraction, what: None)
        report(0.0, "plain target")
        plain_target = self.plain_sample(target_prompt, seed)
        outcome = EditOutcome(to_numpy_image(plain_target), "same seed, no edit" if image is not None else
                              "same noise, no edit", clip_note=self._clip_note or "")
        pair, runs = Pair(source_prompt, target_prompt, id="app"), {}
        with shared_inversions():  # methods that invert alike invert once (the time counts it in both)
            for i, (name, edit) in enumerate(editors.items()):
                report((i + 1) / (len(editors) + 1), f"{name} ({i + 1}/{len(editors)})")
                try:
                    runs[name] = run_method(self.pipe, name, edit, pair, seed, image)
                except UserError as e:
                    outcome.rows.append({"method": name, "error": first_line(e)})
        for run, row in zip(runs.values(), comparison_rows(list(runs.values()), pair, clip)):
            outcome.rows.append({**row, "source": to_numpy_image(run.source), "edited": to_numpy_image(run.edited),
                                 "error": ""})
        outcome.rows.sort(key=lambda r: list(editors).index(r["method"]))
        if clip is not None:
            outcome.plain_clip_score = float(clip.clip_score(plain_target.float(), [target_prompt])[0])
        return outcome

    def plain_sample(self, prompt: str, seed: int, keep: int = 8) -> torch.Tensor:
        """``prompt`` sampled alone from ``seed`` (1, 3, H, W); the last ``keep`` are kept, so editing one pair
        again with other settings samples only the edits."""
        key = (prompt, seed)
        if key not in self._plain:
            self._plain[key] = sample(self.pipe, [prompt], [seed], num_inference_steps=self.num_steps,
                                      guidance_scale=self.guidance, progress=False).images
            while len(self._plain) > keep:
                self._plain.pop(next(iter(self._plain)))
        return self._plain[key]
