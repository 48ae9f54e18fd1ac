"""Probing task (Tables 1–3): capture attention features, train MLP probes per layer, write tables.

``probe.shard=i/n`` captures only the prompts at positions ``p % n == i`` into the shared feature cache
and stops (no probes); an unsharded run afterwards finds every feature cached and trains the probes.
The library: :mod:`probing.features` (capture and cache), :mod:`probing.probe`, :mod:`probing.tables`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from evaluation.shards import parse_shard
from experiments.common import instantiate, load_model, model_fingerprint, model_identity, output_dir, plain
from experiments.tracking import log_probe
from probing.capture import CaptureSpec
from probing.features import FeatureCache, capture_missing
from probing.probe import layer_probes
from probing.prompts import build_prompts, family_file, load_family
from probing.tables import accuracy_table, paper_probe_table, sd1x_layout, write_probe_tables
from sdattn.errors import UserError
from sdattn.layers import enumerate_layers, select_layers
from sdattn.sampling import latent_size


def run(cfg: DictConfig) -> dict:
    """Returns ``{"tables": {stem: DataFrame (mean, %)}, "files": {...}, "layers": [...]}``."""
    p = cfg.probe
    family = load_family(family_file(str(p.family), cfg.paths.data_dir))
    prompts = build_prompts(family, p.n_per_class, p.test_fraction, p.classes)
    classes = list(dict.fromkeys(x.label for x in prompts))
    pipe = load_model(cfg)
    all_layers = enumerate_layers(pipe.unet, latent_size(pipe))
    layers = select_layers(all_layers, plain(p.layers), p.kind)
    spec = CaptureSpec(kind=p.kind, tokens=list(p.tokens), steps=p.steps, grid=p.grid, pool=p.pool)
    if p.kind == "cross" and not spec.tokens:
        raise UserError("probe.tokens is empty: name the words whose cross-attention maps to probe, e.g. ['{cls}']")
    shard = parse_shard(p.get("shard"), "probe.shard")
    cache = FeatureCache(cfg.paths.cache_dir, model_identity(cfg), model_fingerprint(cfg, pipe))
    store = cache.store(family, layers, spec, p.num_inference_steps, p.guidance_scale)
    mine = shard.select(prompts) if shard else prompts
    captured = capture_missing(store, pipe, mine, layers, spec, p.num_inference_steps, p.guidance_scale, p.batch_size,
                               int(p.get("workers") or 1), bool(cfg.progress), of=len(prompts))
    if shard:  # a capture shard: the probes are trained by an unsharded run once all are cached
        left = len(store.missing([x.id for x in prompts]))
        print(f"probe capture shard {shard}: {captured} of {len(mine)} prompts captured now, "
              f"{len(mine) - captured} already cached; {left} of {len(prompts)} prompts of all shards left; "
              f"cache {store.dir}")
        return {"shard": str(shard), "layers": [x.label for x in layers], "tables": {}}
    feats = store.load([x.id for x in prompts])

    y = torch.tensor([classes.index(x.label) for x in prompts])
    train = torch.tensor([x.split == "train" for x in prompts])
    make_trainer = instantiate(cfg.trainer)
    token_names = [t.replace("{cls}", "class word") for t in spec.tokens] if p.kind == "cross" else [None]
    out, tables, files = output_dir(cfg), {}, {}
    for t, token in enumerate(token_names):
        x = {f"L{layer.index}": (feats[layer.label][:, t] if p.kind == "cross" else feats[layer.label]).flatten(1)
             for layer in layers}
        per_class, overall, control = layer_probes(x, y, train, len(classes), list(p.seeds), make_trainer,
                                                   plain(p.mlp), bool(p.control), bool(cfg.progress),
                                                   "probes" + (f" [{token}]" if token else ""))
        mean, std = accuracy_table(per_class, classes, overall, control if p.control else None, 1 / len(classes))
        stem = p.name + (f"_{token.replace(' ', '_')}" if token and len(token_names) > 1 else "")
        caption = f"{p.title} — model {cfg.model.name}" + (f", token '{token}'" if token else "") + \
            f"; test accuracy %, {int((~train).sum())} test images, chance {100 / len(classes):.1f}%"
        paper = paper_probe_table(Path(cfg.paths.data_dir) / "paper", p.name, token) \
            if sd1x_layout(all_layers) else None
        written, shown = write_probe_tables(mean, std, out, stem, caption, len(p.seeds) > 1, paper,
                                            str(cfg.model.name))
        files.update(written)
        tables[stem] = mean
        print(f"\n{shown}\n")
    log_probe(cfg, tables, str(p.name))
    print(f"tables written to {out}")
    return {"tables": tables, "files": files, "layers": [x.label for x in layers], "classes": classes,
            "chance": 1 / len(classes), "out_dir": str(out)}
