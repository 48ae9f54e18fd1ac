"""Hydra task ``eval_toy``: sample the toy model and score colour / shape by pixel analysis.

Writes ``metrics.json`` (color_accuracy, shape_accuracy, per_class, ...), ``samples.jsonl`` and
``samples.png`` into the Hydra run directory (or ``eval.out_dir`` outside Hydra).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _output_dir(cfg) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return HydraConfig.get().runtime.output_dir
    except Exception:
        pass
    ev = cfg.get("eval", {}) or {}
    return ev.get("out_dir", None) or "outputs/eval_toy"


def run(cfg) -> dict:
    from toyworld.evaluate import evaluate

    ev = cfg.get("eval", {}) or {}
    return evaluate(
        model_dir=ev.get("model_dir", "models/toy"),
        out_dir=_output_dir(cfg),
        per_combo=int(ev.get("per_combo", 2)),
        num_inference_steps=int(ev.get("num_inference_steps", 25)),
        guidance_scale=ev.get("guidance_scale", None),
        seed=int(ev.get("seed", 0)),
        batch=int(ev.get("batch", 35)),
        sampler=str(ev.get("sampler", "auto")),
        threads=ev.get("threads", 1),
    )
