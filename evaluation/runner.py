"""Benchmark runner: edit every pair with one method, time it warm, score it, keep it in the record
store (:mod:`evaluation.records`). The runner knows only the paper's scores (CLIP score and directional
similarity, time); every other score — PSNR, SSIM, the DINO structure distance, the toy world's edit
check — is a metric plug-in (:mod:`evaluation.scorers`) the caller passes in as a scorer."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editing.images import fit_image, read_rgb
from editing.inversion import image_size
from editing.methods import timed_edit
from sdattn.errors import UserError, first_line

from .metrics import ClipMetrics
from .records import RecordStore

Scorer = Callable[..., dict]  # (example, source, edited) → {score name: value or None}; {} when it does not apply

clock = time.perf_counter  # tests replace it to make timings reproducible


@dataclass
class RunSummary:
    out_dir: Path
    edited: list[str] = field(default_factory=list)  # ids edited in this run
    resumed: int = 0  # pairs already scored before this run
    errors: dict[str, str] = field(default_factory=dict)  # id → one-line error (this run and earlier)
    missing: int = 0  # pairs skipped: image missing
    missing_first: str | None = None
    resized: int = 0  # real images of this run fitted from another size (of which upsampled)
    upsampled: int = 0

    def line(self, method: str) -> str:
        parts = [f"{method}: {len(self.edited)} pairs edited, {self.resumed} already scored"]
        skipped = self.missing + len(self.errors)
        if skipped:
            why = []
            if self.missing:
                why.append(f"{self.missing} missing images (first: {self.missing_first})")
            if self.errors:
                first = next(iter(self.errors.items()))
                why.append(f"{len(self.errors)} errors (first: {first[0]}: {first[1]})")
            parts.append(f"{skipped} skipped: " + "; ".join(why))
        if self.resized:
            parts.append(f"{self.resized} images resized to the model's size ({self.upsampled} upsampled)")
        return "; ".join(parts)


def timing_context(pipe, run_id: str) -> dict:
    """Where and when rows are timed: run id (rows of one run are timed together), device, versions."""
    import diffusers
    import transformers

    device = getattr(pipe, "device", torch.device("cpu"))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return {"run_id": run_id, "device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def run_pairs(
    pipe,
    dataset,
    method: str,
    edit: Callable,
    out_dir: str | Path,
    clip: ClipMetrics,
    meta: dict,
    seed: int = 0,
    run_id: str = "",
    resize: str = "squash",
    progress: bool = False,
    scorers: Sequence[Scorer] = (),
    on_record: Callable | None = None,
) -> RunSummary:
    """Edit every available pair of ``dataset`` (a LoadedDataset) not yet in ``out_dir``'s record store
    with ``edit(pipe, example, seed, image) -> (source, edited)`` (a method config instantiated).

    Seeds: the example's own seed, else ``seed`` + the pair's position in the dataset. Time per pair
    is measured warm (one uncounted warm-up edit of the first pair to edit; model and CLIP loading
    excluded; ``torch.cuda.synchronize()`` on CUDA) and covers the whole edit (inversion included).
    Real images are read as RGB and fitted to the model's size by ``resize`` (counted in the summary).
    Each record says where and when it was timed (``run_id``: rows of one run are timed together).
    ``scorers``: extra ``(example, source, edited) -> dict`` scores added to each record, in order.
    ``on_record(record, source, edited)`` is called after each scored pair (e.g. an image panel).
    """
    store = RecordStore(out_dir)
    with store.lock():
        return _run_locked(store, pipe, dataset, method, edit, clip, meta, seed, run_id, resize, progress, scorers,
                           on_record)


def _run_locked(store, pipe, dataset, method, edit, clip, meta, seed, run_id, resize, progress, scorers, on_record):
    done = store.open(meta)
    summary = RunSummary(store.dir, resumed=len(done), missing=dataset.missing_examples,
                         missing_first=dataset.missing_images[0] if dataset.missing_images else None)
    summary.errors = {i: r["error"] for i, r in done.items() if r.get("status") == "error"}
    position = {ex.id: i for i, ex in enumerate(dataset.examples)}
    todo = [ex for ex in dataset.available() if ex.id not in done]
    timing = timing_context(pipe, run_id)
    fits = {}  # image path → ImageFit (counted once per image)

    def load(path):
        image, fits[path] = fit_image(read_rgb(path), image_size(pipe), resize)
        return image

    def one(ex):
        s = ex.seed if ex.seed is not None else seed + position[ex.id]
        image = None if ex.image_path is None else load(ex.image_path)
        return s, *timed_edit(pipe, edit, ex, s, image, clock)

    warm = False
    for ex in tqdm(todo, desc=f"benchmark {method}", disable=not progress):
        try:
            if not warm:
                one(ex)  # warm-up edit: not counted
                warm = True
            s, src, edited, dt = one(ex)
        except UserError as e:
            msg = first_line(e)
            summary.errors[ex.id] = msg
            store.append({"id": ex.id, "status": "error", "error": msg})
            continue
        score, directional = clip.pair_scores(src, edited, [ex.source_prompt], [ex.target_prompt])
        rec = {
            "id": ex.id, "status": "ok", "seed": int(s), "source_prompt": ex.source_prompt,
            "target_prompt": ex.target_prompt, "image_path": ex.image_path,
            "clip_score": float(score[0]), "clip_directional": float(directional[0]), "time_s": float(dt),
            "timed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **timing,
        }
        rec.update(getattr(edit, "info", {}))  # what an editor reports of its last edit (PnP: inversion cached?)
        for scorer in scorers:
            rec.update(scorer(ex, src, edited))
        store.save_images(ex.id, src, edited)
        store.append(rec)
        summary.edited.append(ex.id)
        if on_record is not None:
            on_record(rec, src, edited)
    summary.resized = sum(f.resized for f in fits.values())
    summary.upsampled = sum(f.upsampled for f in fits.values())
    return summary
