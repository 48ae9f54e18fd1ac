"""``sdattn --help``: what the tool does, its tasks with one example each, the config groups a user picks
from, and where outputs go — printed before Hydra or torch load (fast), from the config folder itself.

The task list lives here (:data:`TASKS`); ``experiments.run`` dispatches exactly these names to
``experiments.tasks.<name>.run``. A new task is one entry here plus its module.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import yaml

from sdattn.files import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"
HELP_FLAGS = ("--help", "-h")

# task → (what it does, one command that runs it)
TASKS: dict[str, tuple[str, str]] = {
    "probe": ("Tables 1-3: probe what cross- / self-attention maps encode, per layer",
              "sdattn probe=cross_attn probe.n_per_class=4"),
    "edit": ("edit one pair: FPE (edit=fpe, edit=fpe_real), any method (task=edit method=p2p), several side by "
             "side (task=edit edit.methods=[fpe,p2p,masactrl,pnp])",
             'sdattn edit=fpe edit.source_prompt="a white car" edit.target_prompt="a red car"'),
    "benchmark": ("Tables 4-5: one editor on an edit benchmark, scored and timed; rewrites the tables",
                  "sdattn experiment=table4 method=p2p data.limit=4"),
    "merge": ("rebuild Tables 4-5 from every (sharded) benchmark folder, with the accounting",
              "sdattn experiment=merge"),
    "claims": ("check each finding of the paper on a model: numbers, intervals, PASS / FAIL / SKIP",
               "sdattn experiment=claims"),
    "attention_maps": ("Figure 3: per-word cross-attention maps and self-attention components",
                       'sdattn experiment=attention_maps prompt="a white car in the park"'),
    "ablation": ("Figures 4-5: attention maps replaced per layer range / per word",
                 "sdattn experiment=fig4_self"),
    "train_toy": ("train the toy-world diffusion model (models/toy)",
                  "sdattn experiment=train_toy toy.budget_minutes=10"),
    "train_toy_clip": ("train the toy world's CLIP (models/toy_clip)",
                       "sdattn experiment=train_toy_clip toy_clip.budget_minutes=5"),
    "eval_toy": ("score the toy model's samples with the toy world's pixel checker",
                 "sdattn experiment=eval_toy"),
    "eval_toy_edit": ("FPE colour edits on the toy model, scored by the pixel checker",
                      "sdattn experiment=eval_toy_edit"),
    "app": ("the attention explorer in the browser: maps, editors side by side, probe results "
            "(pip install 'sdattn-lab[app]'; also `sdattn app [--share]`)", "sdattn task=app app.port=7860"),
}

# Config groups a user does not pick (settings read from the weights, the null-text schedule, folders,
# the probes' Trainer, the ablation nodes that experiment=fig4_* selects).
INTERNAL_GROUPS = ("model_settings", "null_text", "paths", "trainer", "ablation", "hydra")
GROUP_NOTES = {
    "model": "weights; model.path=<folder or .safetensors> loads any SD-1.x model",
    "probe": "what a probe run probes",
    "edit": "an edit run",
    "experiment": "a preset run of a task",
    "method": "the editor of a benchmark run",
    "data": "the edit benchmark of a benchmark run",
    "logger": "where numbers go besides the run folder",
    "app": "the attention explorer's page (sdattn app): app.port=, app.host=, app.share=",
    "hydra/launcher": "how the jobs of -m run (plugins: pip install 'sdattn-lab[cluster]')",
}


def group_options(config_dir: Path = CONFIG_DIR) -> dict[str, list[str]]:
    """group → its options (config file stems, ``_``-prefixed ones hidden), for the groups a user picks."""
    groups = {}
    for folder in sorted(p for p in config_dir.rglob("*") if p.is_dir()):
        group = folder.relative_to(config_dir).as_posix()
        if group.split("/")[0] in INTERNAL_GROUPS and group != "hydra/launcher":
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
        if options:
            groups[group] = options + (["basic"] if group == "hydra/launcher" else [])
    return groups


def defaults(config_dir: Path = CONFIG_DIR) -> dict[str, str | None]:
    """group → the option ``run.yaml`` picks by default."""
    entries = yaml.safe_load((config_dir / "run.yaml").read_text(encoding="utf-8"))["defaults"]
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()} | {"hydra/launcher": "basic"}


def help_text(config_dir: Path = CONFIG_DIR) -> str:
    prog = "sdattn"
    width = max(map(len, TASKS))
    tasks = [f"  {name:<{width}}  {what}\n  {'':<{width}}    {example}" for name, (what, example) in TASKS.items()]
    chosen, found = defaults(config_dir), group_options(config_dir)
    groups = []
    for group in sorted(found, key=lambda g: (list(GROUP_NOTES).index(g) if g in GROUP_NOTES else len(GROUP_NOTES), g)):
        shown = ", ".join(f"{o}*" if o == chosen.get(group) else o for o in found[group])
        note = f"{group}=  {GROUP_NOTES.get(group, '')}"
        groups += [f"  {note}", *textwrap.wrap(shown, 100, initial_indent="      ", subsequent_indent="      ")]
    return "\n".join([
        f"{prog} — probe and edit with the cross- and self-attention of Stable-Diffusion-style UNets",
        "(Liu et al., CVPR 2024), offline-first; the default model is the shipped toy-world model.",
        "",
        f"usage: {prog} [group=option ...] [key=value ...]        one run",
        f"       {prog} -m [group=a,b ...] [key=x,y ...]          a sweep: one job per combination",
        "       (python -m experiments.run ... is the same command)",
        "",
        "tasks (the config picks one: probe=..., edit=..., experiment=...):",
        *tasks,
        "",
        "config groups (group=option; * = default):",
        *groups,
        "",
        f"every key of a run: {prog} [overrides] --cfg job      (change one: key=value; add one: +key=value)",
        f"your own configs: {prog} --config-dir DIR method=mine  (DIR/method/mine.yaml; any group, same names)",
        "",
        "outputs (under the folder you run in; paths.log_dir= / paths.cache_dir= move them):",
        "  ./outputs/runs/<date>_<time>_<task>-<what>-<model>[_<overrides>]/       a run: tables, images, log",
        "  ./outputs/multiruns/<date>_<time>_<task>/<job>_<what>/                  the jobs of a -m sweep",
        "  ./outputs/benchmark/<model>/<data>/<method>/                            benchmark records + tables",
        "  ./.cache/                                                               captured probe features",
        "  <run folder>/wandb/         W&B runs (offline unless logger.mode=online / WANDB_MODE; `wandb sync`)",
        "",
        f'shell completion (bash): eval "$({prog} -sc install=bash)"      Hydra\'s own help: {prog} --hydra-help',
    ])


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def exit_if_help(argv: list[str] | None = None) -> None:
    """Print the help and exit 0 when ``argv`` asks for it (nothing else is loaded)."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        try:
            print(help_text(), flush=True)
        except BrokenPipeError:  # `sdattn --help | head`: the reader left
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more to flush at exit
        sys.exit(0)
