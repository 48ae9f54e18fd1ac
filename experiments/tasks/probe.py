"""Probing task (Tables 1–3): capture attention features, train MLP probes per layer, write tables.

``probe.shard=i/n`` captures only the prompts at positions ``p % n == i`` into the shared feature cache
and stops (no probes); an unsharded run afterwards finds every feature cached and trains the probes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from evaluation.shards import Shard, parse_shard
from experiments.common import (
    instantiate,
    load_model,
    model_fingerprint,
    model_identity,
    output_dir,
    plain,
)
from experiments.interleave import twin_pipeline
from experiments.tracking import log_probe
from probing.capture import CaptureSpec, capture_features
from probing.probe import train_probe
from probing.prompts import build_prompts, load_family, resolve_token, word_token_positions
from probing.store import FeatureStore
from probing.tables import accuracy_table, beside_paper, formatted, paper_caption, paper_probe_table, sd1x_layout
from sdattn.errors import UserError
from sdattn.layers import enumerate_layers, select_layers
from sdattn.sampling import check_prompts, latent_size
from sdattn.tables import write_table


def family_path(cfg: DictConfig) -> Path:
    fam = str(cfg.probe.family)
    return Path(fam) if fam.endswith(".yaml") else Path(cfg.paths.data_dir) / "probe" / f"{fam}.yaml"


def in_workers(pipe, batches: list, work, workers: int):
    """Yield ``(batch, work(pipe, batch))`` for every batch, in order. ``workers`` > 1: that many threads,
    each with its own UNet modules (:func:`~experiments.interleave.twin_pipeline`: weights shared, so its own
    hooks) and one torch thread, so the CPU's cores work side by side without the intra-op threads' spin
    waits (two intra-op threads on a busy 2-core machine run ~5× slower than one). A batch's result depends
    only on its prompts and seeds, not on the worker."""
    if workers < 1:
        raise UserError(f"probe.workers {workers} must be ≥ 1")
    if workers == 1 or len(batches) < 2:
        for batch in batches:
            yield batch, work(pipe, batch)
        return
    pipes = [pipe] + [twin_pipeline(pipe) for _ in range(min(workers, len(batches)) - 1)]
    free: Queue = Queue()
    for worker_pipe in pipes:
        free.put(worker_pipe)

    def run(batch):
        worker_pipe = free.get()
        try:
            return work(worker_pipe, batch)
        finally:
            free.put(worker_pipe)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(pipes)) as pool:
            yield from zip(batches, pool.map(run, batches))
    finally:
        torch.set_num_threads(threads)


def collect_features(cfg: DictConfig, pipe, prompts, layers, spec: CaptureSpec, family: dict,
                     shard: Shard | None = None) -> dict | None:
    """Features of every prompt, generated once and cached on disk (resumable). With ``shard``: only that
    shard's prompts are captured (other shards may fill the same cache at once) and None is returned.
    The cache key holds the weights' fingerprint: a model retrained in place gets new features."""
    p = cfg.probe
    store = FeatureStore(Path(cfg.paths.cache_dir) / "features", {
        "model": model_identity(cfg), "weights": model_fingerprint(cfg, pipe),
        "family": family, "kind": spec.kind, "tokens": list(spec.tokens),
        "steps": str(spec.steps), "grid": spec.grid, "pool": spec.pool, "layers": [x.name for x in layers],
        "num_inference_steps": p.num_inference_steps, "guidance_scale": p.guidance_scale,
    })
    mine = shard.select(prompts) if shard else prompts
    todo = [x for x in mine if x.id in set(store.missing([x.id for x in mine]))]
    check_prompts(pipe.tokenizer, [x.prompt for x in todo])  # every prompt and word, before any capture
    for x in todo:
        for t in spec.tokens:
            word_token_positions(pipe.tokenizer, x.prompt, resolve_token(t, x))  # a word not in the prompt
    by_id = {x.id: x for x in todo}
    bar = tqdm(total=len(todo), desc=f"capture ({len(todo)} of {len(prompts)} images)", disable=not cfg.progress)
    batches = [[x.id for x in todo[i:i + p.batch_size]] for i in range(0, len(todo), p.batch_size)]
    workers = int(p.get("workers") or 1)
    lanes = [lane for lane in (batches[w::workers] for w in range(workers)) if lane]  # one per worker thread

    def fill(worker_pipe, lane: list[list[str]]) -> int:
        def capture(ids: list[str]) -> dict:
            batch = [by_id[i] for i in ids]
            words = [[resolve_token(t, x) for t in spec.tokens] for x in batch]
            feats = capture_features(worker_pipe, layers, spec, [x.prompt for x in batch], [x.seed for x in batch],
                                     words, p.num_inference_steps, p.guidance_scale)
            bar.update(len(ids))
            return feats

        # each batch captured once, also when another job fills the same cache at the same time
        return store.fill(lane, capture)

    captured = sum(n for _, n in in_workers(pipe, lanes, fill, workers))
    bar.close()
    if shard:
        left = len(store.missing([x.id for x in prompts]))
        print(f"probe capture shard {shard}: {captured} of {len(mine)} prompts captured now, "
              f"{len(mine) - captured} already cached; {left} of {len(prompts)} prompts of all shards left; "
              f"cache {store.dir}")
        return None
    return store.load([x.id for x in prompts])


def run(cfg: DictConfig) -> dict:
    """Returns ``{"tables": {stem: DataFrame (mean, %)}, "files": {...}, "layers": [...]}``."""
    p = cfg.probe
    family = load_family(family_path(cfg))
    prompts = build_prompts(family, p.n_per_class, p.test_fraction, p.classes)
    classes = list(dict.fromkeys(x.label for x in prompts))
    pipe = load_model(cfg)
    all_layers = enumerate_layers(pipe.unet, latent_size(pipe))
    layers = select_layers(all_layers, plain(p.layers), p.kind)
    spec = CaptureSpec(kind=p.kind, tokens=list(p.tokens), steps=p.steps, grid=p.grid, pool=p.pool)
    if p.kind == "cross" and not spec.tokens:
        raise UserError("probe.tokens is empty: name the words whose cross-attention maps to probe, e.g. ['{cls}']")
    shard = parse_shard(p.get("shard"), "probe.shard")
    feats = collect_features(cfg, pipe, prompts, layers, spec, family, shard)
    if feats is None:  # a capture shard: the probes are trained by an unsharded run once all are cached
        return {"shard": str(shard), "layers": [x.label for x in layers], "tables": {}}

    y = torch.tensor([classes.index(x.label) for x in prompts])
    train = torch.tensor([x.split == "train" for x in prompts])
    make_trainer = instantiate(cfg.trainer)
    token_names = [t.replace("{cls}", "class word") for t in spec.tokens] if p.kind == "cross" else [None]
    out, tables, files = output_dir(cfg), {}, {}
    for t, token in enumerate(token_names):
        per_class, overall, control = {}, {}, {}
        for layer in tqdm(layers, desc="probes" + (f" [{token}]" if token else ""), disable=not cfg.progress):
            x = feats[layer.label]
            x = (x[:, t] if p.kind == "cross" else x).flatten(1)
            col = f"L{layer.index}"
            for s in p.seeds:
                kw = dict(n_classes=len(classes), make_trainer=make_trainer, seed=int(s), **p.mlp)
                r = train_probe(x[train], y[train], x[~train], y[~train], **kw)
                per_class.setdefault(col, []).append(r.per_class.numpy())
                overall.setdefault(col, []).append(r.overall)
                if p.control:
                    control.setdefault(col, []).append(
                        train_probe(x[train], y[train], x[~train], y[~train], shuffle_labels=True, **kw).overall)
        mean, std = accuracy_table(per_class, classes, overall, control if p.control else None, 1 / len(classes))
        stem = p.name + (f"_{token.replace(' ', '_')}" if token and len(token_names) > 1 else "")
        caption = f"{p.title} — model {cfg.model.name}" + (f", token '{token}'" if token else "") + \
            f"; test accuracy %, {int((~train).sum())} test images, chance {100 / len(classes):.1f}%"
        table = formatted(mean, std, with_std=len(p.seeds) > 1)
        files[stem] = write_table(table, out, stem, caption)
        tables[stem] = mean
        shown, shown_caption = table, caption
        paper = paper_probe_table(Path(cfg.paths.data_dir) / "paper", p.name, token) \
            if sd1x_layout(all_layers) else None
        if paper is not None:  # the paper's numbers in the cells we share (same class, same layer number)
            shown, shown_caption = beside_paper(table, paper), f"{caption}; {paper_caption(paper, str(cfg.model.name))}"
            files[f"{stem}_vs_paper"] = write_table(shown, out, f"{stem}_vs_paper", shown_caption)
        print(f"\n{shown_caption}\n{shown.to_markdown()}\n")
    log_probe(cfg, tables, str(p.name))
    print(f"tables written to {out}")
    return {"tables": tables, "files": files, "layers": [x.label for x in layers], "classes": classes,
            "chance": 1 / len(classes), "out_dir": str(out)}
