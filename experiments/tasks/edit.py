"""Editing task: one pair edited by any method (``method=<name>``: ``configs/method/<name>.yaml``) or by
several side by side (``edit.methods=[fpe,p2p,...]`` → ``compare.png``, the paper's Fig. 8), on a generated
pair or a real image (``edit.image``). ``edit=fpe`` / ``edit=fpe_real`` are FPE's shorthands.
The library: :mod:`editing.methods` (build, run and save one method), :mod:`evaluation.compare`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from editing.images import load_image
from editing.inversion import image_size
from editing.methods import Pair, build_method, method_settings, run_method, save_run, with_settings
from evaluation.compare import compare_methods, comparison_rows, comparison_table, write_comparison
from evaluation.metric_models import load_clip
from evaluation.reconstruction import reconstruction_line, reconstruction_warning, round_trip_psnr
from experiments.common import load_model, method_config, output_dir, plain
from sdattn.errors import UserError


def method_names(cfg: DictConfig) -> list[str]:
    """``edit.methods``, else the one chosen with ``method=``; refused when neither or a name repeats."""
    e = cfg.edit
    names = [str(n) for n in plain(e.methods)] if e.get("methods") else []
    if not names and cfg.get("method"):
        names = [str(cfg.method.name)]
    if not names:
        raise UserError("task=edit needs a method: method=<a config of configs/method/, e.g. p2p> or "
                        "edit.methods=[fpe,p2p,masactrl,pnp]")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"edit.methods names {repeated[0]!r} twice; each method once")
    unknown = sorted(set(plain(e.settings) or {}) - set(names))
    if unknown:
        raise UserError(f"edit.settings.{unknown[0]}: {unknown[0]!r} is not one of the methods run "
                        f"({', '.join(names)})")
    return names


def report_reconstruction(value: float, cfg: DictConfig) -> None:
    """A real image's reconstruction quality, and a warning line when the model cannot represent it."""
    print(reconstruction_line(value, cfg.min_reconstruction_psnr))
    warning = reconstruction_warning(value, cfg.min_reconstruction_psnr, str(cfg.model.name))
    if warning:
        print(warning)


def run(cfg: DictConfig) -> dict:
    """Writes source, edited, grid and latents (per method in ``<method>/`` when comparing, with
    ``compare.png/json/md``); returns the files and the runs."""
    e = cfg.edit
    names = method_names(cfg)
    specs = {n: with_settings(method_config(cfg, n), (plain(e.settings) or {}).get(n)) for n in names}
    editors = [build_method(specs[n]) for n in names]  # a bad setting or target → one line before any loading
    # edit.image (required by edit=fpe_real, readable) is checked by the schema (experiments.schema) before this
    comparing = bool(e.get("methods"))
    clip = load_clip(str(e.clip), device=cfg.device) if comparing and e.clip else None
    pipe = load_model(cfg)
    image = None if e.image is None else load_image(str(e.image), image_size(pipe), cfg.resize)
    if image is not None:  # before any edit: can the model represent the image?
        report_reconstruction(round_trip_psnr(pipe, image), cfg)
    pair = Pair(str(e.source_prompt), str(e.target_prompt))
    source_caption = pair.source_prompt if image is None else Path(str(e.image)).name
    out = output_dir(cfg)
    kind = "generated" if image is None else "real image"
    if not comparing:
        (name, edit), = editors
        result = run_method(pipe, name, edit, pair, int(cfg.seed), image, bool(e.warmup))
        files = save_run(result, out, (source_caption, pair.target_prompt), int(e.cell))
        print(f"{name} ({kind}): {result.seconds:.2f} s; files in {out}")
        return {"files": files, "runs": [result]}
    runs = compare_methods(pipe, editors, pair, int(cfg.seed), image, bool(e.warmup))
    rows = comparison_rows(runs, pair, clip)
    settings = {"seed": int(cfg.seed), "image": None if image is None else str(e.image), "clip": plain(e.clip),
                "warmup": bool(e.warmup), "model": str(cfg.model.name),
                "settings": {n: method_settings(s) for n, s in specs.items()}}
    files = write_comparison(out, runs, rows, pair, source_caption, settings, int(e.cell))
    print(f"{len(runs)} methods ({kind}), seed {cfg.seed}: {pair.source_prompt!r} → {pair.target_prompt!r}"
          f"{'' if clip else ' (no CLIP: edit.clip=null)'}\n{comparison_table(rows)}\ncomparison: {files['compare']}")
    return {"files": files, "runs": runs, "rows": rows, "editors": dict(editors)}
