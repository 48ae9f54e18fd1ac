"""A run's results in the configured logger (``logger=wandb``, the default, | ``csv`` | ``none``), the way
W&B users read them: the resolved Hydra config as the run config; ``group`` = the multirun (every job of
one ``-m`` shares it; a single run is its own group; a W&B sweep's runs share ``sweep-<id>``); ``job_type``
= the task; ``name`` = the run folder's name; tags = model and task. Numbers are scalars (one key per
number, so runs compare in the runs table), per-layer numbers also against a ``layer`` step axis (one line
per run: a sweep's cross and self probes on one plot), tables keep numeric columns, images are logged
as media (offline: inside the run folder, ``<run>/wandb/offline-run-*/files/media``).

Tasks hand over their results as plain dicts and DataFrames (:func:`log_probe`, :func:`log_benchmark`,
:func:`log_claims`); everything W&B-specific is here. A CSV logger gets the config and the scalars.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from evaluation.tables import mean_std
from experiments.cli import task_of

# Keys of the logger node that are Lightning's WandbLogger's own, not wandb.init's.
LIGHTNING_ONLY = ("_target_", "save_dir", "dir", "offline", "anonymous", "log_model", "prefix", "checkpoint_name",
                  "version", "id", "experiment", "add_file_policy")
LAYER_AXIS = "layer"


# --------------------------------------------------------------------------- which logger, which run
def logger_kind(cfg: DictConfig) -> str | None:
    """"wandb", "lightning" (another Lightning logger, e.g. CSV) or None (``logger=none``)."""
    node = cfg.get("logger")
    if not node:
        return None
    return "wandb" if str(node.get("_target_", "")).endswith("WandbLogger") else "lightning"


def run_folder(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def group_of(cfg: DictConfig) -> str:
    """The multirun's sweep folder name (all its jobs), a W&B sweep's id, else the run's own folder name."""
    from hydra.core.hydra_config import HydraConfig

    if os.environ.get("WANDB_SWEEP_ID"):
        return f"sweep-{os.environ['WANDB_SWEEP_ID']}"
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            return Path(hc.sweep.dir).name
    return run_folder(cfg).name


def run_config(cfg: DictConfig) -> dict:
    """The run's config, resolved (what every setting actually was); unresolvable values kept as written."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra run: log it unresolved
        return OmegaConf.to_container(cfg, resolve=False)


def run_identity(cfg: DictConfig, name: str | None = None) -> dict:
    """wandb.init's group / job_type / name / tags / config for this run (the logger node's own win)."""
    node = cfg.logger
    model = str(OmegaConf.select(cfg, "model.name", default="") or "")
    tags = [t for t in (model, task_of(_root_=cfg)) if t] + list(node.get("tags") or [])
    return {"group": node.get("group") or group_of(cfg), "job_type": node.get("job_type") or task_of(_root_=cfg),
            "name": name or node.get("name") or run_folder(cfg).name, "tags": list(dict.fromkeys(tags)),
            "config": run_config(cfg)}


def start_wandb(cfg: DictConfig, name: str | None = None, save_dir: str | Path | None = None):
    """A W&B run for this job (offline unless ``logger.mode`` / ``WANDB_MODE`` say otherwise), its files
    under ``save_dir`` (default: the run folder) in ``wandb/``."""
    import wandb

    node = OmegaConf.to_container(cfg.logger, resolve=True)
    init = {k: v for k, v in node.items() if k not in LIGHTNING_ONLY}
    init.update(run_identity(cfg, name))
    folder = Path(save_dir or node.get("save_dir") or run_folder(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    return wandb.init(dir=str(folder), reinit="finish_previous", **init)  # a run left open never absorbs this one


# --------------------------------------------------------------------------- generic results
def _number(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def log_results(cfg: DictConfig, scalars: dict[str, float] | None = None, *,
                by_layer: dict[int, dict[str, float]] | None = None, tables: dict[str, pd.DataFrame] | None = None,
                images: dict[str, list[tuple[object, str]]] | None = None, charts: dict[str, dict] | None = None,
                text: dict[str, str] | None = None) -> None:
    """Log one job's results to the configured logger and close its run.

    ``scalars``: {key: number}; ``by_layer``: {layer index: {key: number}} against the ``layer`` axis;
    ``tables``: {key: DataFrame} (numeric columns stay numeric); ``images``: {key: [(image or PNG path,
    caption)]} (media files in the run's folder; W&B keeps images inside tables outside it, so none there);
    ``charts``: {key: {"xs": [...], "ys": {series: [...]}, "title": str, "x": axis name}} (a line plot per
    run); ``text``: {key: str} (summary strings, e.g. verdicts). A CSV logger gets the config and the
    scalars; ``logger=none`` nothing."""
    kind = logger_kind(cfg)
    scalars = {k: v for k, v in (scalars or {}).items() if _number(v) is not None}
    if kind is None:
        return
    if kind == "lightning":
        from hydra.utils import instantiate

        logger = instantiate(cfg.logger)
        logger.log_hyperparams(run_config(cfg))
        logger.log_metrics({k: float(v) for k, v in scalars.items()})
        logger.finalize("success")
        return
    import wandb

    run = start_wandb(cfg)
    try:
        if by_layer:
            run.define_metric(LAYER_AXIS)
            for key in {k for values in by_layer.values() for k in values}:
                run.define_metric(key, step_metric=LAYER_AXIS)
            for layer in sorted(by_layer):
                run.log({LAYER_AXIS: layer, **{k: v for k, v in by_layer[layer].items() if _number(v) is not None}})
        payload: dict = {k: float(v) for k, v in scalars.items()}
        for key, df in (tables or {}).items():
            cell = lambda v: str(v) if isinstance(v, Path) else (v.item() if hasattr(v, "item") else v)  # noqa: E731
            payload[key] = wandb.Table(columns=[str(c) for c in df.columns],
                                       data=[[cell(v) for v in row] for row in df.itertuples(index=False)])
        for key, items in (images or {}).items():
            if items:
                payload[key] = [wandb.Image(str(img) if isinstance(img, Path) else img, caption=cap)
                                for img, cap in items]
        for key, c in (charts or {}).items():
            payload[key] = wandb.plot.line_series(xs=list(c["xs"]), ys=[list(v) for v in c["ys"].values()],
                                                  keys=list(c["ys"]), title=c["title"], xname=c.get("x", "x"))
        if payload:
            run.log(payload)
        run.summary.update(text or {})
    finally:
        run.finish()


def _key(text: str) -> str:
    """A metric key part: spaces and symbols → "_"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")


# --------------------------------------------------------------------------- probe
def log_probe(cfg: DictConfig, tables: dict[str, pd.DataFrame], probe_name: str) -> None:
    """Probe tables (rows: classes, overall, control, chance; columns ``L<i>`` and ``Avg``; accuracy %) →
    ``accuracy[_<token>]/<row>/<column>`` scalars, the per-layer rows against the ``layer`` axis
    (``accuracy[_<token>]_by_layer/<row>``: a sweep's cross and self runs on one plot), a line plot of
    overall / control / chance over the layers, and each table with numeric columns."""
    scalars, by_layer, charts, out_tables = {}, {}, {}, {}
    for stem, table in tables.items():
        token = stem[len(probe_name):].lstrip("_") if stem.startswith(probe_name) else stem
        prefix = "accuracy" + (f"_{_key(token)}" if token else "")
        for row in table.index:
            for col in table.columns:
                scalars[f"{prefix}/{_key(row)}/{col}"] = table.at[row, col]
        layer_cols = [c for c in table.columns if re.fullmatch(r"L\d+", str(c))]
        for col in layer_cols:
            by_layer.setdefault(int(col[1:]), {}).update(
                {f"{prefix}_by_layer/{_key(row)}": table.at[row, col] for row in table.index})
        lines = {str(r): [float(table.at[r, c]) for c in layer_cols] for r in table.index if not _is_class(r, table)}
        charts[f"charts/{prefix}_over_layers"] = {"xs": [int(c[1:]) for c in layer_cols], "ys": lines,
                                                  "title": f"{stem}: test accuracy (%) over layers", "x": LAYER_AXIS}
        out_tables[f"tables/{stem}"] = table.rename_axis("class").reset_index()
    log_results(cfg, scalars, by_layer=by_layer, tables=out_tables, charts=charts)


def _is_class(row, table: pd.DataFrame) -> bool:
    """Rows before "overall" are the classes."""
    rows = list(table.index)
    return "overall" in rows and rows.index(row) < rows.index("overall")


# --------------------------------------------------------------------------- benchmark
def log_benchmark(cfg: DictConfig, data: str, method: str, rows_by_method: dict[str, list[dict]],
                  metrics: dict[str, str], out_dir: str | Path, this_run: Iterable[str], n_images: int) -> None:
    """One benchmark job: this method's mean of each metric (``benchmark/<metric>``, ``…_std``, ``pairs``:
    runs of a sweep compare method against method), every method's means on this dataset as a numeric
    table (``table4/<data>``), and the first ``n_images`` edited pairs of this run (else of the records):
    source and edited images captioned with prompts and scores (``images/<data>/<method>``) and a table
    of their prompts, scores and image files (``samples/<data>/<method>``)."""
    scalars = {"benchmark/pairs": len(rows_by_method.get(method, []))}
    table = []
    for m, rows in rows_by_method.items():
        row = {"method": m, "pairs": len(rows)}
        for key in metrics:
            row[key], row[f"{key}_std"] = mean_std([_number(r.get(key)) for r in rows])
            if m == method:
                scalars[f"benchmark/{key}"], scalars[f"benchmark/{key}_std"] = row[key], row[f"{key}_std"]
        table.append(row)
    records = {r["id"]: r for r in rows_by_method.get(method, [])}
    ids = [i for i in this_run if i in records] or list(records)
    folder, samples, images = Path(out_dir) / "images", [], []
    for i in ids[:n_images]:
        r, src, edited = records[i], folder / f"{i}_source.png", folder / f"{i}.png"
        if src.is_file() and edited.is_file():
            scores = {k: _number(r.get(k)) for k in metrics}
            samples.append({"id": i, "source": src, "edited": edited, "source_prompt": r["source_prompt"],
                            "target_prompt": r["target_prompt"], **scores})
            shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if v is not None)
            images += [(src, f"{i} source: {r['source_prompt']}"),
                       (edited, f"{i} edited: {r['target_prompt']}; {shown}")]
    tables = {f"table4/{data}": pd.DataFrame(table)}
    if samples:
        tables[f"samples/{data}/{method}"] = pd.DataFrame(samples)
    log_results(cfg, scalars, tables=tables, images={f"images/{data}/{method}": images})


# --------------------------------------------------------------------------- claims
VERDICT_VALUE = {"PASS": 1.0, "FAIL": 0.0}  # SKIP: no number


def log_claims(cfg: DictConfig, claims: list[dict], figures: list[Path]) -> None:
    """Claims (``Claim.to_dict()``) → ``claims/<key>/pass`` (1 / 0; none for SKIP) and the verdict as a summary
    string, each check's mean / interval / threshold as scalars, a table of every check, the figures."""
    scalars, text, rows = {}, {}, []
    for c in claims:
        key = f"claims/{_key(c['key'])}"
        text[f"{key}/verdict"] = c["verdict"]
        if c["verdict"] in VERDICT_VALUE:
            scalars[f"{key}/pass"] = VERDICT_VALUE[c["verdict"]]
        for n, check in enumerate(c.get("checks", [])):
            for field in ("mean", "lo", "hi", "threshold"):
                scalars[f"{key}/check{n}/{field}"] = check.get(field)
            scalars[f"{key}/check{n}/passed"] = float(bool(check.get("passed")))
            rows.append({"claim": c["key"], "verdict": c["verdict"], "check": check.get("what"),
                         **{f: _number(check.get(f)) for f in ("mean", "lo", "hi", "threshold")},
                         "passed": bool(check.get("passed"))})
    scalars["claims/passed"] = sum(c["verdict"] == "PASS" for c in claims)
    scalars["claims/failed"] = sum(c["verdict"] == "FAIL" for c in claims)
    images = {f"figures/{Path(p).stem}": [(Path(p), Path(p).stem)] for p in figures}
    log_results(cfg, scalars, tables={"claims/checks": pd.DataFrame(rows)} if rows else None, images=images,
                text=text)
