"""Entry point: ``python -m experiments.run [group=option ...] [key=value ...]``.

Thin by design: check the command line (every job's config composed and validated before anything
runs), then for each job print its settings, pick the task and call ``experiments.tasks.<task>.run(cfg)``.
Bad input (:class:`sdattn.errors.UserError`, Hydra's composition errors included) is printed as one
``error: ...`` line with exit status 2; ``SDATTN_VERBOSE=1`` shows the full traceback instead.
"""

from __future__ import annotations

from sdattn.env import set_process_defaults

set_process_defaults()  # never wait on the hub unless the user asks (HF_HUB_OFFLINE=0)

import importlib  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from experiments.help import TASKS, exit_if_help  # noqa: E402

if __name__ == "__main__":
    exit_if_help()  # `--help`: printed before Hydra and torch load

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments.cli import (  # noqa: E402
    CONFIG_DIR,
    PROJECT_ROOT,
    check_command_line,
    register_resolvers,
    remove_if_empty,
    settings_line,
    task_of,
    tee_stdout,
    verbose,
)
from experiments.launcher import check_launcher  # noqa: E402
from experiments.validate import validate  # noqa: E402
from sdattn.errors import UserError  # noqa: E402

__all__ = ["PROJECT_ROOT", "TASKS", "dispatch", "main", "task_name"]

register_resolvers()


def task_name(cfg: DictConfig) -> str:
    name = task_of(_root_=cfg)
    if name not in TASKS:
        raise UserError(f"task {name!r} is not one of {list(TASKS)}")
    return name


def dispatch(cfg: DictConfig):
    """Validate the config, then run the configured task and return its result."""
    validate(cfg)
    module = importlib.import_module(f"experiments.tasks.{task_name(cfg)}")
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    return module.run(cfg)


def fail(message: str, run_dir: Path | None = None, code: int = 2):
    if run_dir is not None:
        remove_if_empty(run_dir)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="run")
def main(cfg: DictConfig):
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        with tee_stdout(run_dir / f"{hc.job.name}.log"):
            print(settings_line(cfg))
            dispatch(cfg)
    except UserError as e:
        if verbose():
            raise
        fail(str(e), run_dir)
    except KeyboardInterrupt:
        print("interrupted: everything already written is kept; re-run to resume", file=sys.stderr)
        sys.exit(130)


def cli(argv: list[str] | None = None) -> None:
    """``python -m experiments.run``: check the whole command line first, then let Hydra run it."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_launcher(argv)
        check_command_line(argv)
    except UserError as e:
        if verbose():
            raise
        fail(str(e))
    main()


if __name__ == "__main__":
    cli()
