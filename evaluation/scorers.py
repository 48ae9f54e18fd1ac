"""Per-pair scores as plug-ins: a metric is one function plus one config of ``configs/metric/``, found by
name like a method (``metric=[psnr,ssim,mine]`` or ``+metric=mine``; the benchmark experiments list their
defaults). The runner adds what each returns to the pair's record; the tables show each column the config
describes. The runner's own scores are the paper's: CLIP score, CLIP directional similarity, time.

``configs/metric/<name>.yaml``::

    <name>:
      _target_: package.module.function   # (example, source, edited) -> {record key: value or None}
      _partial_: true                     # (or no _partial_: a factory returning that callable, None = off)
      <setting>: ...                      # the function's keywords
      columns:                            # record key → its Table 4 column
        <key>: {header: "Name ↑", digits: 2, missing: unreadable}

``example`` has ``id``, ``source_prompt``, ``target_prompt``, ``image_path`` and ``extra``; source and
edited are (1, 3, H, W) in [0, 1]. A function returns {} for pairs it does not apply to, and None for a
score it cannot give on this pair (``missing`` says why, default "not scored"): such a pair is left out of
that column's mean and counted ("over 3 of 4 pairs; 1 unreadable").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import OmegaConf

from sdattn.config import instantiate
from sdattn.errors import UserError

COLUMN_KEYS = ("header", "digits", "missing")
DEFAULT_DIGITS = 2
DEFAULT_MISSING = "not scored"


@dataclass
class Metric:
    """A built metric: its score function, the Table 4 columns of the keys it returns, and its settings
    (what identifies it in the record store's meta, with the scorer's ``fingerprint`` when it has one)."""

    name: str
    score: Callable[..., dict]
    columns: dict[str, dict]
    settings: dict


def column_spec(metric: str, key: str, spec) -> dict:
    """``{header, digits, missing}`` of one column (``digits`` and ``missing`` defaulted); bad → UserError."""
    if not isinstance(spec, dict) or not spec.get("header"):
        raise UserError(f"metric.{metric}.columns.{key} needs a header, e.g. {{header: \"Score ↑\", digits: 2}}")
    unknown = sorted(set(spec) - set(COLUMN_KEYS))
    if unknown:
        raise UserError(f"metric.{metric}.columns.{key}.{unknown[0]} is not a column key; keys: "
                        f"{', '.join(COLUMN_KEYS)}")
    digits = spec.get("digits", DEFAULT_DIGITS)
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise UserError(f"metric.{metric}.columns.{key}.digits={digits!r}: allowed an integer ≥ 0")
    return {"header": str(spec["header"]), "digits": digits, "missing": str(spec.get("missing") or DEFAULT_MISSING)}


def build_metrics(node) -> list[Metric]:
    """The metrics of a ``metric`` config node ({name: config}; None = none), in order; those whose factory
    returns None (switched off, e.g. the structure distance without a model) are left out."""
    specs = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    out = []
    for name, spec in specs.items():
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise UserError(f"metric {name!r} has no _target_: give its score function (with _partial_: true) "
                            "or a factory, e.g. _target_: evaluation.metrics.psnr_score")
        spec = dict(spec)
        columns = {str(k): column_spec(name, str(k), v) for k, v in (spec.pop("columns", None) or {}).items()}
        if not columns:
            raise UserError(f"metric {name!r} lists no columns: give columns: {{<record key>: {{header: ...}}}}")
        score = instantiate(spec, _convert_="all")
        if score is None:
            continue
        settings = {k: v for k, v in spec.items() if not k.startswith("_")}
        if getattr(score, "fingerprint", None) is not None:
            settings["fingerprint"] = score.fingerprint
        out.append(Metric(str(name), score, columns, {"target": spec["_target_"], **settings}))
    clash = [k for i, m in enumerate(out) for k in m.columns if any(k in o.columns for o in out[:i])]
    if clash:
        raise UserError(f"two metrics return the record key {clash[0]!r}; give one of them another key")
    return out


def scorer(metric: Metric) -> Callable[..., dict]:
    """``metric`` as the runner calls it, checked: it returns only the keys its config lists."""
    def score(example, source, edited) -> dict:
        values = metric.score(example, source, edited)
        unknown = sorted(set(values) - set(metric.columns))
        if unknown:
            raise UserError(f"metric {metric.name!r} returned {unknown[0]!r}, which its config's columns do not "
                            f"list ({', '.join(metric.columns)})")
        return values

    return score


def metrics_meta(metrics: list[Metric]) -> dict:
    """{name: settings} of the metrics (what a resumed run must have been scored with)."""
    return {m.name: m.settings for m in metrics}


def metrics_columns(metrics: list[Metric]) -> list[dict]:
    """The metrics' columns in order, each {key, header, digits, missing} (a list: the record store's meta is
    written with sorted keys; :func:`evaluation.records.collect_columns` reads it back)."""
    return [{"key": k, **v} for m in metrics for k, v in m.columns.items()]
