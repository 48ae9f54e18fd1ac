"""Entry point: ``python -m experiments.run [group=option ...] [key=value ...]``.

Thin by design: compose the config, pick the task, call ``experiments.tasks.<task>.run(cfg)``.
Bad input (:class:`sdattn.errors.UserError`) is printed as one line with exit status 2.
"""

from __future__ import annotations

from sdattn.env import set_process_defaults

set_process_defaults()  # never wait on the hub unless the user asks (HF_HUB_OFFLINE=0)

import importlib  # noqa: E402
import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sdattn.files import REPO_ROOT as PROJECT_ROOT  # noqa: E402

CONFIG_DIR = str(PROJECT_ROOT / "configs")
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))

TASKS = ("probe", "edit", "attention_maps", "ablation", "train_toy", "eval_toy", "eval_toy_edit", "train_toy_clip",
         "benchmark")


def task_name(cfg: DictConfig) -> str:
    name = cfg.get("task") or ("edit" if cfg.get("edit") else "probe")
    if name not in TASKS:
        from sdattn.errors import UserError

        raise UserError(f"task {name!r} is not one of {list(TASKS)}")
    return name


def dispatch(cfg: DictConfig):
    """Run the configured task and return its result."""
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    module = importlib.import_module(f"experiments.tasks.{task_name(cfg)}")
    return module.run(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="run")
def main(cfg: DictConfig):
    from sdattn.errors import UserError

    try:
        dispatch(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: everything already written is kept; re-run to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
