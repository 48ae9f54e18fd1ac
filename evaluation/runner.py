"""Benchmark runner: edit every pair with one method, time it warm, score it, keep it on disk.

Layout under the benchmark root (one folder per dataset × method, so multirun jobs never share a file)::

    <root>/<data>/<method>/meta.json      what produced the rows (a re-run with other settings is refused)
    <root>/<data>/<method>/pairs.jsonl    one JSON line per pair, appended with flush + fsync
    <root>/<data>/<method>/images/<id>.png (+ <id>_source.png)
    <root>/<data>/table4.{csv,md,tex}     rows = methods of that dataset
    <root>/table5.{csv,md,tex}            rows = methods × columns = datasets

A killed run loses at most the pair in flight: a torn last line is dropped on read (and cut off before
the next append), and a re-run skips every pair already in ``pairs.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sdattn.errors import UserError, first_line

from .metrics import DEFAULT_CLIP_MODEL, ClipMetrics, psnr, ssim

TINY_CLIP = "tiny-random"
TOY_CLIP = "toy"  # the toy world's CLIP shipped in models/toy_clip (toyworld/clip.py)
TOY_CLIP_PATH = Path(__file__).resolve().parents[1] / "models" / "toy_clip"
COLUMNS = {  # metric key → paper header (Table 4); the columns after Time are our additions
    "clip_score": "CLIP score ↑",
    "clip_directional": "CLIP dir. sim. ↑",
    "time_s": "Time (s) ↓",
    "psnr": "PSNR ↑",
    "ssim": "SSIM ↑",
    "structure": "Structure dist. ↓",
    "toy_edit_ok": "Edit correct ↑",
    "toy_mask_iou": "Mask IoU ↑",
}
OPTIONAL = ("structure", "toy_edit_ok", "toy_mask_iou")  # columns shown only when some row has them
REL_FPE = "Time rel. FPE"
TABLE5_METRICS = ("clip_score", "clip_directional")

_clock = time.perf_counter  # tests replace it to make timings reproducible


# ------------------------------------------------------------------------------------------ CLIP

def tiny_clip(words: Sequence[str] | None = None, seed: int = 0) -> ClipMetrics:
    """A seeded tiny random CLIP built from config (smoke runs only: its numbers mean nothing)."""
    from transformers import CLIPConfig, CLIPModel

    from sdattn.models import read_vocab
    from sdattn.tokenizer import build_word_tokenizer

    if words is None:
        words = read_vocab(Path(__file__).resolve().parents[1] / "datasets" / "tiny_vocab.txt")
    tok = build_word_tokenizer(list(words), model_max_length=77)
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, **ids),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    return ClipMetrics(model, tok)


def load_clip(name: str | None, device=None) -> ClipMetrics:
    """``metrics.clip``: a hub id / folder (ModelLoadError when unavailable), ``toy`` (the shipped
    toy-world CLIP) or ``tiny-random``."""
    name = name or DEFAULT_CLIP_MODEL
    if name == TINY_CLIP:
        clip = tiny_clip()
    else:
        clip = ClipMetrics.from_pretrained(str(TOY_CLIP_PATH) if name == TOY_CLIP else name)
    return clip if device is None else ClipMetrics(clip.model, clip.tokenizer, device=device)


# ------------------------------------------------------------------------------------ pair records

def _fsync_append(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_pairs(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of ``pairs.jsonl``; a torn (unparseable) last line is ignored, and with ``repair``
    the file is rewritten without it (tmp + rename) so the next append starts on a clean line."""
    p = Path(path)
    if not p.is_file():
        return []
    text = p.read_text(encoding="utf-8")
    rows, good = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            continue
    clean = "".join(g + "\n" for g in good)
    if repair and text != clean:
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(clean, encoding="utf-8")
        os.replace(tmp, p)
    return rows


def _save_png(image: torch.Tensor, path: Path) -> None:
    from editing.grid import to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    to_pil(image).save(tmp)
    os.replace(tmp, path)


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class RunSummary:
    out_dir: Path
    edited: list[str] = field(default_factory=list)  # ids edited in this run
    resumed: int = 0  # pairs already scored before this run
    errors: dict[str, str] = field(default_factory=dict)  # id → one-line error (this run and earlier)
    missing: int = 0  # pairs skipped: image missing
    missing_first: str | None = None

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
        return "; ".join(parts)


def run_pairs(
    pipe,
    dataset,
    method: str,
    edit: Callable,
    out_dir: str | Path,
    clip: ClipMetrics,
    meta: dict,
    seed: int = 0,
    load_image: Callable | None = None,
    progress: bool = False,
    structure: Callable | None = None,
    on_record: Callable | None = None,
) -> RunSummary:
    """Edit every available pair of ``dataset`` (a LoadedDataset) not yet in ``out_dir/pairs.jsonl`` with
    ``edit(pipe, example, seed, image) -> (source, edited)`` (a method config instantiated).

    Seeds: the example's own seed, else ``seed`` + the pair's position in the dataset. Time per pair
    is measured warm (one uncounted warm-up edit of the first pair to edit; model and CLIP loading
    excluded; ``torch.cuda.synchronize()`` on CUDA) and covers the whole edit (inversion included).
    ``structure``: optional (source, edited) → (B,) structure distance (DINO self-similarity).
    Toy-world pairs (``extra["target"]``) are also checked by the toy world's pixel classifier.
    ``on_record(record, source, edited)`` is called after each scored pair (e.g. an image panel).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise UserError(f"benchmark.out_dir {str(out)!r} holds rows made with other settings ({', '.join(diff)}); "
                            "give another benchmark.out_dir or delete that folder")
    else:
        tmp = meta_path.with_name("meta.json.tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        os.replace(tmp, meta_path)
    pairs_path = out / "pairs.jsonl"
    done = {r["id"]: r for r in read_pairs(pairs_path, repair=True)}
    summary = RunSummary(out, resumed=len(done), missing=dataset.missing_examples,
                         missing_first=dataset.missing_images[0] if dataset.missing_images else None)
    summary.errors = {i: r["error"] for i, r in done.items() if r.get("status") == "error"}
    position = {ex.id: i for i, ex in enumerate(dataset.examples)}
    todo = [ex for ex in dataset.available() if ex.id not in done]
    cuda = torch.cuda.is_available() and getattr(pipe, "device", torch.device("cpu")).type == "cuda"
    size = None

    def one(ex):
        nonlocal size
        s = ex.seed if ex.seed is not None else seed + position[ex.id]
        image = None
        if ex.image_path is not None:
            if load_image is None:
                from editing.inversion import image_size
                from editing.inversion import load_image as li

                size = size or image_size(pipe)
                image = li(ex.image_path, size)
            else:
                image = load_image(ex.image_path)
        if cuda:
            torch.cuda.synchronize()
        t0 = _clock()
        src, edited = edit(pipe, ex, s, image)
        if cuda:
            torch.cuda.synchronize()
        return s, src, edited, _clock() - t0

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
            _fsync_append(pairs_path, json.dumps({"id": ex.id, "status": "error", "error": msg}))
            continue
        score, directional = clip.edit_scores(src, edited, [ex.source_prompt], [ex.target_prompt])
        rec = {
            "id": ex.id, "status": "ok", "seed": int(s), "source_prompt": ex.source_prompt,
            "target_prompt": ex.target_prompt, "image_path": ex.image_path,
            "clip_score": float(score[0]), "clip_directional": float(directional[0]),
            "psnr": _finite(float(psnr(edited, src)[0])), "ssim": float(ssim(edited, src)[0]),
            "time_s": float(dt),
        }
        if structure is not None:
            rec["structure"] = float(structure(src, edited)[0])
        if "target" in ex.extra:
            rec.update(toy_scores(ex, src, edited))
        _save_png(edited, out / "images" / f"{ex.id}.png")
        _save_png(src, out / "images" / f"{ex.id}_source.png")
        _fsync_append(pairs_path, json.dumps(rec))
        summary.edited.append(ex.id)
        if on_record is not None:
            on_record(rec, src, edited)
    return summary


def toy_scores(example, source: torch.Tensor, edited: torch.Tensor) -> dict:
    """Toy-world check of an edit by the renderer's pixel classifier (toyworld/evaluate.py):
    ``toy_edit_ok`` = 1 when the edited image shows the target's colour and shape, and
    ``toy_mask_iou`` = IoU of the object masks of source and edited (layout kept)."""
    from toyworld.evaluate import classify_image

    color, shape, mask_e = classify_image(edited[0])
    _, _, mask_s = classify_image(source[0])
    target = example.extra["target"]
    union = (mask_s | mask_e).sum()
    return {"toy_edit_ok": float(color == target["color"] and shape == target["shape"]),
            "toy_mask_iou": float((mask_s & mask_e).sum() / union) if union else 0.0}


# ---------------------------------------------------------------------------------------- tables

def collect(root: str | Path, clip_name: str) -> dict[str, dict[str, list[dict]]]:
    """{dataset: {method: ok records}} of every ``<root>/<data>/<method>/`` scored with ``clip_name``."""
    out: dict[str, dict[str, list[dict]]] = {}
    for pairs in sorted(Path(root).glob("*/*/pairs.jsonl")):
        meta_path = pairs.parent / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("clip", clip_name) != clip_name:
            continue
        rows = [r for r in read_pairs(pairs) if r.get("status") == "ok"]
        if rows:
            data = meta.get("data", pairs.parent.parent.name)
            method = meta.get("method", pairs.parent.name)
            out.setdefault(data, {})[method] = rows
    return out


def _mean_std(values: list) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None], dtype=float)
    return (float("nan"), float("nan")) if v.size == 0 else (float(v.mean()), float(v.std()))


def _fmt(mean: float, std: float, digits: int) -> str:
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


DIGITS = {"clip_score": 2, "clip_directional": 3, "time_s": 2, "psnr": 2, "ssim": 3, "structure": 4,
          "toy_edit_ok": 2, "toy_mask_iou": 2}


ROW_ORDER = ("fpe", "p2p", "masactrl", "pnp", "sdedit_0.5", "sdedit_0.75", "diffedit", "pix2pix_zero",
             "instructpix2pix")


def _order(methods) -> list[str]:
    """FPE first, then the other methods in registry order, then any others by name."""
    return sorted(methods, key=lambda m: (ROW_ORDER.index(m) if m in ROW_ORDER else len(ROW_ORDER), m))


def table4(rows_by_method: dict[str, list[dict]]) -> pd.DataFrame:
    """Rows = methods; columns = the paper's (CLIP score, CLIP dir. sim., Time) + PSNR, SSIM (+ time
    relative to FPE when FPE rows exist). Cells "mean ± std" over pairs."""
    fpe_time = _mean_std([r["time_s"] for r in rows_by_method["fpe"]])[0] if "fpe" in rows_by_method else None
    data = {}
    present = [k for k in COLUMNS if k not in OPTIONAL
               or any(r.get(k) is not None for rows in rows_by_method.values() for r in rows)]
    for m in _order(rows_by_method):
        rows = rows_by_method[m]
        cells = {COLUMNS[k]: _fmt(*_mean_std([r.get(k) for r in rows]), DIGITS[k]) for k in present}
        if fpe_time:
            cells[REL_FPE] = f"{_mean_std([r['time_s'] for r in rows])[0] / fpe_time:.2f}×"
        cells["Pairs"] = str(len(rows))
        data[m] = cells
    return pd.DataFrame.from_dict(data, orient="index")


def table5(collected: dict[str, dict[str, list[dict]]]) -> pd.DataFrame:
    """Rows = methods; columns = "<dataset> <metric>" for CLIP score and CLIP dir. sim."""
    methods = _order({m for d in collected.values() for m in d})
    data = {m: {} for m in methods}
    for ds in sorted(collected):
        for m in methods:
            rows = collected[ds].get(m)
            for k in TABLE5_METRICS:
                data[m][f"{ds} {COLUMNS[k]}"] = _fmt(*_mean_std([r.get(k) for r in rows]), DIGITS[k]) if rows else "–"
    return pd.DataFrame.from_dict(data, orient="index")


def caption(what: str, clip_name: str) -> str:
    text = f"{what}; CLIP: {clip_name}"
    if clip_name == TINY_CLIP:
        text += " (seeded tiny random CLIP: smoke run, the numbers are meaningless)"
    return text


def write_tables(root: str | Path, clip_name: str, model_name: str = "") -> dict:
    """Aggregate everything under ``root`` scored with ``clip_name``; write Table 4 per dataset and
    Table 5 across datasets. Returns {"table4": {data: (DataFrame, paths)}, "table5": (DataFrame, paths)}."""
    from probing.tables import write_table

    root = Path(root)
    collected = collect(root, clip_name)
    result: dict = {"table4": {}, "table5": None}
    model = f", model {model_name}" if model_name else ""
    for ds, by_method in collected.items():
        t = table4(by_method)
        cap = caption(f"Table 4 — {ds}{model}: mean ± std over pairs, time = s/image (warm)", clip_name)
        result["table4"][ds] = (t, write_table(t, root / ds, "table4", cap, index_label="method"), cap)
    if collected:
        t = table5(collected)
        cap = caption(f"Table 5 — methods × datasets{model}: mean ± std over pairs", clip_name)
        result["table5"] = (t, write_table(t, root, "table5", cap, index_label="method"), cap)
    return result
