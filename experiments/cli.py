"""What the command line needs around Hydra: config resolvers, a check of the overrides before Hydra
runs anything (so a typo is one ``error:`` line, exit 2, like every other bad input), the run's log file
and the clean-up of a failed run's folder."""

from __future__ import annotations

import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sdattn.errors import UserError, first_line
from sdattn.files import REPO_ROOT
from sdattn.settings import load_settings

PROJECT_ROOT = REPO_ROOT
CONFIG_DIR = PROJECT_ROOT / "configs"
SD1X_SETTINGS = CONFIG_DIR / "model_settings" / "sd1x.yaml"
VERBOSE_ENV = "SDATTN_VERBOSE"  # =1: full tracebacks instead of one-line errors (for developers)
SLUG_MAX = 80


def slug(text: str) -> str:
    """``text`` as a short, safe folder-name part."""
    s = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(text)).strip("_")
    return s[:SLUG_MAX]


def task_of(*, _root_: DictConfig) -> str:
    """The task a config runs: ``task``, else "edit" when an edit config is chosen (``edit.name``: edit=fpe),
    else "probe"."""
    return OmegaConf.select(_root_, "task", default=None) or (
        "edit" if OmegaConf.select(_root_, "edit.name", default=None) else "probe")


def work_dir() -> str:
    """The folder the command runs in (Hydra's, before any ``hydra.job.chdir``): runs write under it."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def run_name(*, _root_: DictConfig) -> str:
    """What a run folder is named after: the task and what it runs (probe, edit, method, data, model)."""
    sel = lambda key: OmegaConf.select(_root_, key, default=None)  # noqa: E731
    task = task_of(_root_=_root_)
    edited = sel("edit.name") or ("compare" if sel("edit.methods") else sel("method.name"))
    parts = {"probe": [sel("probe.name")], "edit": [edited], "ablation": [sel("ablation.name")],
             "benchmark": [sel("benchmark.table"), sel("method.name"), sel("data.name")]}.get(task, [task])
    if task == "probe" or task == "edit":
        parts = [task, *parts]
    return slug("-".join(str(p) for p in [*parts, sel("model.name")] if p))


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0").lower() in ("1", "true", "yes", "on")


def register_resolvers() -> None:
    resolvers = {
        "project_root": lambda: str(PROJECT_ROOT),
        "model_settings": lambda path: load_settings(path, SD1X_SETTINGS),
        "run_name": run_name,
        "task_name": task_of,
        "work_dir": work_dir,
        "suffix": lambda text: f"_{slug(text)}" if slug(text) else "",
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _jobs_overrides(overrides: list[str]) -> list[list[str]]:
    """Override lists that cover every value of every sweep (one job per swept value, the other sweeps
    at their first value) — enough to compose each value once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed]
    base = [f"{o.get_key_element()}={v[0]}" if o.is_sweep_override() else v[0] for o, v in zip(parsed, values)]
    jobs = [base]
    for i, (o, v) in enumerate(zip(parsed, values)):
        for alt in v[1:]:
            jobs.append(base[:i] + [f"{o.get_key_element()}={alt}"] + base[i + 1:])
    return jobs


def check_command_line(argv: list[str], config_name: str = "run") -> None:
    """Compose every job of ``argv`` and validate it: Hydra's errors (an unknown group option, a
    misspelled key, a bad override) and bad values become one :class:`UserError` before anything runs."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    from .search_path import search_path_override
    from .validate import validate

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.cfg:
        return  # Hydra's own output, not a run
    user = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    search = search_path_override(args.config_dir, args.overrides)  # the user's own config folders
    try:
        jobs = _jobs_overrides(user)
    except Exception as e:  # noqa: BLE001 - Hydra's override grammar errors, one line
        raise UserError(f"bad override: {first_line(e)}") from e
    sets_output = any(o.startswith("paths.output_dir=") for o in user)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            for job in jobs:
                extra = [] if sets_output else ["paths.output_dir=" + str(Path(work_dir()) / "outputs" / "check")]
                try:
                    cfg = compose(config_name, overrides=job + extra + search)
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001 - Hydra's composition errors, one line
                    raise UserError(_hydra_message(e)) from e
                validate(cfg)
    finally:
        GlobalHydra.instance().clear()


def _hydra_message(e: BaseException) -> str:
    """Hydra's error as one line: the failure, the offending key, and the allowed options."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Could not override"):  # a misspelled / unknown key
        key = lines[0].removeprefix("Could not override ").rstrip(".")
        return f"{key} is not a key of this config (misspelled? `--cfg job` lists every key; +key=value adds one)"
    if any(ln.startswith("Available options") for ln in lines):
        i = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        options = []
        for ln in lines[i + 1:]:
            if ln.startswith("Config search path"):
                break
            options += [] if ln.startswith("_") else [ln]
        head = lines[0].removeprefix("In 'run': ")
        return f"{head}; {lines[i].rstrip(':')}: {', '.join(options)}"
    return re.sub(r"\s+", " ", " ".join(lines[:2]))


@contextmanager
def tee_stdout(log_file: Path):
    """Everything the run prints also goes to ``log_file`` (Hydra's run.log), as it is printed."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = sys.stdout

    class Tee:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            out.write(s)
            self.f.write(s)
            return len(s)

        def flush(self):
            out.flush()
            self.f.flush()

        def __getattr__(self, name):
            return getattr(out, name)

    with open(log_file, "a", encoding="utf-8") as f:
        sys.stdout = Tee(f)
        try:
            yield
        finally:
            sys.stdout = out


def remove_if_empty(run_dir: Path) -> None:
    """Delete a failed run's folder when it holds nothing but Hydra's bookkeeping (config and log)."""
    if not run_dir.is_dir():
        return
    left = [p for p in run_dir.iterdir() if p.name not in (".hydra", "run.log", "multirun.yaml")]
    if not left:
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent  # a multirun's sweep folder with no other job in it
        if parent.is_dir() and all(p.name in (".hydra", "multirun.yaml") for p in parent.iterdir()):
            shutil.rmtree(parent, ignore_errors=True)


# task → the config node holding the sampling settings it uses (default: the node named as the task)
SETTINGS_NODE = {"benchmark": "method", "edit": "method", "eval_toy": "eval", "eval_toy_edit": "method",
                 "merge": "benchmark", "train_toy": "toy", "train_toy_clip": "toy_clip"}
NO_MODEL_TASKS = ("merge", "train_toy", "train_toy_clip")  # tasks that load no model of model=


def settings_line(cfg: DictConfig) -> str:
    """The first line of a run: the task, what it runs, and the values it uses — the task's own sampling
    settings and layers (a value given on the command line, else the preset's), model, dtype, device, seed."""
    task = task_of(_root_=cfg)
    key = SETTINGS_NODE.get(task, task)
    node = cfg.get(key) if isinstance(cfg.get(key), DictConfig) else OmegaConf.create()
    methods = OmegaConf.select(cfg, "edit.methods")
    what = {"benchmark": f"{cfg.method.name} on {cfg.data.name}" if cfg.get("method") and cfg.get("data") else None,
            "edit": OmegaConf.select(cfg, "edit.name") or (
                f"{', '.join(methods)} side by side" if methods else node.get("name"))}
    label = what.get(task, node.get("name"))
    head = f"{task}" + (f" {label}" if label and label != task else "")
    if task in NO_MODEL_TASKS:
        return f"{head}: seed {cfg.seed}"
    m = cfg.model
    where = m.get("path") or m.get("id") or m.pipeline.get("_target_")
    steps = node.get("num_inference_steps") or m.steps
    guidance = node.get("guidance_scale") or m.guidance_scale
    layers = f", {key}.layers {node.layers}" if node.get("layers") is not None else ""
    return (f"{head}: model {m.name} ({where}; settings: {m.settings.source}): {steps} steps, guidance {guidance}"
            f"{layers}, {cfg.dtype} on {cfg.device}, seed {cfg.seed}")
