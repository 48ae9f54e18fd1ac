"""The attention explorer in the browser (issue 24): maps, editors and probe results on the configured model.

``python -m experiments.run task=app [model=...] [device=...] [app.port=7860] [app.host=127.0.0.1]``
serves the page (:mod:`experiments.app`) until Ctrl-C. Needs the extra: ``pip install '.[app]'``.
"""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig

from sdattn.errors import UserError


def run(cfg: DictConfig) -> dict:
    if importlib.util.find_spec("gradio") is None:  # not imported here: the server sets its temporary folder first
        raise UserError("task=app needs the app extra: pip install '.[app]' (gradio)")

    from experiments.app.server import serve

    return serve(cfg)
