"""Features of many prompts (the probe tables, the claims' probes): captured in batches, side by side in
worker threads, into the on-disk feature cache (:class:`probing.store.FeatureStore`), each prompt once
across processes. Interrupted runs resume; capture shards (``probe.shard=i/n``) fill one cache together."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

import torch
from tqdm.auto import tqdm

from sdattn.errors import UserError
from sdattn.layers import LayerId
from sdattn.models import twin_pipeline
from sdattn.sampling import check_prompts
from sdattn.text import word_token_positions

from .capture import CaptureSpec, capture_features
from .prompts import ProbePrompt, resolve_token
from .store import FeatureStore


def in_workers(pipe, batches: list, work: Callable, workers: int):
    """Yield ``(batch, work(pipe, batch))`` for every batch, in order. ``workers`` > 1: that many threads,
    each with its own UNet modules (:func:`~sdattn.models.twin_pipeline`: weights shared, so its own
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


@dataclass(frozen=True)
class FeatureCache:
    """The features of one model under ``<cache_dir>/features/``: ``model`` its identity (name, path, pipeline,
    dtype), ``weights`` its weights' fingerprint (a model retrained in place gets new features)."""

    cache_dir: str | Path
    model: dict
    weights: str

    def store(self, family: dict, layers: Sequence[LayerId], spec: CaptureSpec, num_inference_steps: int,
              guidance_scale: float) -> FeatureStore:
        """The store of these capture settings (``features/<hash>/``, the hash of the model, the prompt family
        and every capture setting)."""
        return FeatureStore(Path(self.cache_dir) / "features", {
            "model": self.model, "weights": self.weights, "family": family, "kind": spec.kind,
            "tokens": list(spec.tokens), "steps": str(spec.steps), "grid": spec.grid, "pool": spec.pool,
            "layers": [x.name for x in layers], "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
        })


def capture_missing(store: FeatureStore, pipe, prompts: Sequence[ProbePrompt], layers: Sequence[LayerId],
                    spec: CaptureSpec, num_inference_steps: int, guidance_scale: float, batch_size: int,
                    workers: int = 1, progress: bool = False, of: int | None = None) -> int:
    """Capture the features of every prompt of ``prompts`` the store does not hold yet, ``batch_size``
    prompts per sampling call, the batches spread over ``workers`` threads (:func:`in_workers`; each batch
    captured once, also when another job fills the same cache at the same time). Every prompt and word is
    checked before any capture. ``of``: all prompts of the run (the progress bar's total; a shard's prompts
    are fewer). Returns how many prompts this call captured."""
    todo = [x for x in prompts if x.id in set(store.missing([x.id for x in prompts]))]
    check_prompts(pipe.tokenizer, [x.prompt for x in todo])  # every prompt and word, before any capture
    for x in todo:
        for t in spec.tokens:
            word_token_positions(pipe.tokenizer, x.prompt, resolve_token(t, x))  # a word not in the prompt
    by_id = {x.id: x for x in todo}
    bar = tqdm(total=len(todo), desc=f"capture ({len(todo)} of {of or len(prompts)} images)", disable=not progress)
    batches = [[x.id for x in todo[i:i + batch_size]] for i in range(0, len(todo), batch_size)]
    lanes = [lane for lane in (batches[w::workers] for w in range(workers)) if lane]  # one per worker thread

    def fill(worker_pipe, lane: list[list[str]]) -> int:
        def capture(ids: list[str]) -> dict:
            batch = [by_id[i] for i in ids]
            words = [[resolve_token(t, x) for t in spec.tokens] for x in batch]
            feats = capture_features(worker_pipe, layers, spec, [x.prompt for x in batch], [x.seed for x in batch],
                                     words, num_inference_steps, guidance_scale)
            bar.update(len(ids))
            return feats

        return store.fill(lane, capture)

    captured = sum(n for _, n in in_workers(pipe, lanes, fill, workers))
    bar.close()
    return captured
