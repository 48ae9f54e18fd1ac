"""Probe runs of several probed features on one prompt set (``experiment=claims``, claims (a), (b)): the
accuracy of every probed feature × layer × probe seed, each seed on its own random train/test split.
Features come from the probe feature cache (:mod:`probing.features`): the probe task's capture, shared."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sdattn.errors import UserError
from sdattn.layers import enumerate_layers, select_layers
from sdattn.sampling import latent_size

from .capture import CaptureSpec
from .features import FeatureCache, capture_missing
from .probe import train_probe
from .prompts import ProbePrompt, build_prompts

CAPTURE_KEYS = ("family", "steps", "grid", "layers", "num_inference_steps", "guidance_scale", "batch_size")


@dataclass(frozen=True)
class ProbeSet:
    """One probed feature: its name, the probe settings it is captured and probed with (a
    ``configs/probe/*.yaml`` node as plain values) and the word (cross maps; None for self maps)."""

    name: str
    probe: dict
    word: str | None  # token spec of a cross map ("{cls}" = the class word)


def probe_sets(cross: dict, self_: dict, tokens: dict, no_colour: str, colour: str) -> list[ProbeSet]:
    """Table 1's class word (``cross``), Table 2's self maps (``self_``), Table 3's other words (``tokens``),
    each once; ``no_colour`` and ``colour`` (claim (b)'s words) must be among the probed words."""
    if cross["kind"] != "cross" or self_["kind"] != "self" or tokens["kind"] != "cross":
        raise UserError("claims.probes: cross and tokens must probe cross-attention maps, self self-attention maps")
    if not cross["family"] == self_["family"] == tokens["family"]:
        raise UserError(f"claims.probes: one prompt family for all probes, not {cross['family']!r}, "
                        f"{self_['family']!r} and {tokens['family']!r}")
    sets = [ProbeSet(f"cross: {w.replace('{cls}', 'colour word')}", cross, w) for w in cross["tokens"]]
    sets.append(ProbeSet("self", self_, None))
    sets += [ProbeSet(f"cross: {w}", tokens, w) for w in tokens["tokens"] if w not in cross["tokens"]]
    for w in (no_colour, colour):
        if f"cross: {w}" not in [s.name for s in sets]:
            raise UserError(f"claims.words: {w!r} is not one of the probed words {list(tokens['tokens'])}")
    return sets


def random_split(image_seeds: list[int], n_test: int, seed: int) -> torch.Tensor:
    """(N,) bool train mask: ``n_test`` of the image seeds, drawn at random by ``seed``, are the test split
    of every class. Split by image seed, as the probe task's: every class holds out the same noise seeds,
    so no test image has a training twin from the same noise (one layout, another colour)."""
    held_out = np.random.default_rng(seed).choice(sorted(set(image_seeds)), n_test, replace=False)
    return torch.from_numpy(~np.isin(np.asarray(image_seeds), held_out))


def _capture_key(probe: dict) -> tuple:
    return tuple(json.dumps(probe[k], sort_keys=True) for k in CAPTURE_KEYS)


def capture_sets(pipe, sets: list[ProbeSet], prompts: list[ProbePrompt], family: dict, cache: FeatureCache,
                 progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{set name: {layer label: (N, F) features}}. Cross sets with the same capture settings share one
    sampling pass (their words captured together); everything goes through the probe feature ``cache``."""
    groups: dict[tuple, list[ProbeSet]] = {}
    for s in sets:
        groups.setdefault((s.probe["kind"], _capture_key(s.probe)), []).append(s)
    out = {}
    for (kind, _), members in groups.items():
        p = members[0].probe
        layers = select_layers(enumerate_layers(pipe.unet, latent_size(pipe)), p["layers"], kind)
        words = [s.word for s in members] if kind == "cross" else []
        spec = CaptureSpec(kind=kind, tokens=words, steps=p["steps"], grid=p["grid"], pool=p["pool"])
        store = cache.store(family, layers, spec, p["num_inference_steps"], p["guidance_scale"])
        capture_missing(store, pipe, prompts, layers, spec, p["num_inference_steps"], p["guidance_scale"],
                        p["batch_size"], int(p.get("workers") or 1), progress)
        feats = store.load([x.id for x in prompts])
        for s in members:
            t = words.index(s.word) if kind == "cross" else None
            out[s.name] = {x.label: (feats[x.label][:, t] if t is not None else feats[x.label]).flatten(1)
                           for x in layers}
    return out


def probe_runs(pipe, sets: list[ProbeSet], family: dict, classes: list[str] | None, n_per_class: int,
               test_fraction: float, seeds: list[int], make_trainer: Callable, cache: FeatureCache,
               progress: bool = False) -> dict:
    """Probe accuracy per set × layer × probe seed, each seed on its own random split (:func:`random_split`,
    ``test_fraction`` of the ``n_per_class`` images of each class of ``classes``; None: the family's).
    → {"runs": DataFrame (set, layer, seed, accuracy), "sets", "chance", "n_images", "n_test", "classes"}."""
    prompts = build_prompts(family, n_per_class, test_fraction, classes)
    classes = list(dict.fromkeys(x.label for x in prompts))
    y = torch.tensor([classes.index(x.label) for x in prompts])
    n_test = sum(1 for x in prompts if x.label == classes[0] and x.split == "test")  # images per class
    image_seeds = [x.seed for x in prompts]
    feats = capture_sets(pipe, sets, prompts, family, cache, progress)
    rows = []
    fits = [(s, layer, seed) for s in sets for layer in feats[s.name] for seed in seeds]
    for s, layer, seed in tqdm(fits, desc="probes", disable=not progress):
        train = random_split(image_seeds, n_test, int(seed))
        x = feats[s.name][layer]
        r = train_probe(x[train], y[train], x[~train], y[~train], n_classes=len(classes), make_trainer=make_trainer,
                        seed=int(seed), **s.probe["mlp"])
        rows.append({"set": s.name, "layer": layer, "seed": int(seed), "accuracy": r.overall})
    return {"runs": pd.DataFrame(rows), "sets": [s.name for s in sets], "chance": 1 / len(classes),
            "n_images": len(prompts), "n_test": n_test * len(classes), "classes": classes}
