"""Hydra task ``eval_toy``: sample the toy model and score colour / shape by pixel analysis.

Writes ``metrics.json`` (color_accuracy, shape_accuracy, per_class, ...), ``samples.jsonl`` and
``samples.png`` into the run directory.
"""

from __future__ import annotations

from experiments.common import output_dir
from toyworld.evaluate import evaluate


def run(cfg) -> dict:
    ev = cfg.eval
    return evaluate(
        model_dir=ev.model_dir,
        out_dir=str(output_dir(cfg)),
        per_combo=int(ev.per_combo),
        num_inference_steps=int(ev.num_inference_steps),
        guidance_scale=ev.guidance_scale,
        seed=int(ev.seed),
        batch=int(ev.batch),
        threads=ev.threads,
        grammar=ev.get("grammar"),
    )
