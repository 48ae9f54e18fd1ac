"""The settings schema: one schema per config group, keyed on the path of each setting in its group.

A :class:`Group` maps a setting's path inside the group (``num_inference_steps``, ``mlp.batch_size``) to
its check; :data:`MOUNTS` says where each group sits in the run config (``probe`` at ``probe`` and at
``claims.probes.<name>``, ``null_text`` inside ``edit`` and ``method``). A key gets a rule only where a
group names its path: a new key called ``n`` or ``strength`` picks up nothing by its name. A group
whose node has a ``_target_`` takes exactly its target's keyword arguments (``method.bogus`` is refused).

The schema also says what a run reads: :data:`TASK_READS` (the top-level nodes each task reads) and,
for keys that no YAML file sets, which ones a ``+key=value`` may add (a path a group names, or a
keyword of a ``_target_`` node). Defaults live in the YAML files only; the schema has none.

Checks that need the model (layer indices, words of a prompt, image sizes) stay with the code that
loads it.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from experiments.help import TASKS
from sdattn.errors import UserError, first_line

# (full dotted key, value, the group's node as plain Python) → None, or UserError naming key and value
Check = Callable[[str, object, dict], None]

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed's range for non-negative seeds
DTYPES = ("float32", "float16", "bfloat16")
SHOWN = 12  # settings listed in an error
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def task_of(*, _root_) -> str:
    """The task a config runs: ``task``, else "edit" when an edit config is chosen (``edit.name``: edit=fpe),
    else "probe" (the one rule: run, run folder names, the multirun folder through the ``task_name``
    resolver, tracking, what a run reads)."""
    from omegaconf import OmegaConf

    return OmegaConf.select(_root_, "task", default=None) or (
        "edit" if OmegaConf.select(_root_, "edit.name", default=None) else "probe")


# ------------------------------------------------------------------------------------------ checks

def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_seed(key: str, value) -> None:
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise UserError(f"{key}={value!r} is not a seed; allowed: an integer 0..{SEED_MAX}")


def seed(key, value, node) -> None:
    if value is not None:
        check_seed(key, value)


def seeds(key, value, node) -> None:
    """A list of seeds (one seed is accepted as a list of one)."""
    if value is None:
        return
    if not isinstance(value, list):
        return check_seed(key, value)
    if not value:
        raise UserError(f"{key}=[] is empty; allowed: a list of integer seeds")
    for i, s in enumerate(value):
        check_seed(f"{key}[{i}]", s)


def step_count(key, value, node) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise UserError(f"{key}={value!r} is not a step count; allowed: an integer ≥ 1")


def guidance(key, value, node) -> None:
    if value is not None and (not _is_number(value) or not math.isfinite(value) or value < 1):
        raise UserError(f"{key}={value!r} is not a guidance scale; allowed: a finite number ≥ 1 "
                        "(1 disables classifier-free guidance)")


def count(key, value, node) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise UserError(f"{key}={value!r}: allowed an integer ≥ 1 (or null for the default)")


def number(key, value, node) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise UserError(f"{key}={value!r} is not a number; allowed: a finite number")


def fraction(key, value, node) -> None:
    if value is not None and (not _is_number(value) or not (math.isfinite(value) and 0 <= value <= 1)):
        raise UserError(f"{key}={value!r} is outside [0, 1]; allowed: a fraction")


def step_window(key, value, node) -> None:
    """The steps a setting acts on, as fractions (:class:`sdattn.steps.StepSpec`: f, [start, end], "all", ...);
    per image kind ({generated: .., real: ..})."""
    from sdattn.steps import StepSpec

    if isinstance(value, dict):
        for kind, v in value.items():
            if kind not in ("generated", "real"):
                raise UserError(f"{key}.{kind} is not an image kind; allowed: generated, real")
            step_window(f"{key}.{kind}", v, node)
    elif value is not None:
        StepSpec.parse(value, "fraction", key)


def shard(key, value, node) -> None:
    from evaluation.shards import parse_shard

    parse_shard(value, key)


def boolean(key, value, node) -> None:
    if value is not None and not isinstance(value, bool):
        raise UserError(f"{key}={value!r} is not a boolean; allowed: true, false")


def one_of(*options) -> Check:
    def check(key, value, node) -> None:
        if value not in options:
            raise UserError(f"{key}={value!r} is not one of {list(options)}")
    return check


def resize(key, value, node) -> None:
    from editing.images import RESIZE_MODES

    one_of(*RESIZE_MODES)(key, value, node)


def device(key, value, node) -> None:
    import torch

    try:
        dev = torch.device(str(value))
    except (RuntimeError, TypeError) as e:
        raise UserError(f"{key}={value!r} is not a torch device; allowed: cpu, cuda, cuda:<n>, mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={value!r} but CUDA is not available here; use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"{key}={value!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}={value!r} but MPS is not available here; use device=cpu")


def prompt(required: Callable[[dict], bool] = lambda node: True, why: str = "the edit goes toward it") -> Check:
    """A prompt that must say something when ``required(node)``: an empty one would run unguided."""
    def check(key, value, node) -> None:
        if not isinstance(value, str) and value is not None:
            raise UserError(f"{key}={value!r} is not a prompt; allowed: a text")
        if required(node) and not (value or "").strip():
            raise UserError(f"{key}={value!r} is empty; allowed: a non-empty prompt ({why})")
    return check


def output_dir(key, value, node) -> None:
    """A folder the run writes to (made if missing): writable, before anything is loaded."""
    from experiments.outputs import check_writable

    if value is not None:
        check_writable(key, value)


def input_file(key, value, node) -> None:
    from experiments.outputs import check_readable

    if value is not None:
        check_readable(key, value)


def input_image(required: Callable[[dict], bool] = lambda node: True) -> Check:
    """An image file the run reads: it exists and decodes (read now, before any model loads)."""
    def check(key, value, node) -> None:
        from editing.images import read_rgb

        if value is None or value == "":
            if required(node):
                where = f"for edit={node['name']}" if node.get("name") else "here"
                raise UserError(f"{key} is required {where}: give {key}=path/to/photo.jpg")
            return
        read_rgb(value)
    return check


def anything(key, value, node) -> None:
    """A setting read as given (a model name): checked where it is loaded."""


# ------------------------------------------------------------------------------------------ groups

@dataclass(frozen=True)
class Group:
    """The checks of one config group, keyed on the path of each setting inside the group. ``target``:
    the group's node is a ``_target_`` call whose keyword arguments are its settings (``ignore``: keys
    the caller takes out before the call)."""

    keys: dict[str, Check] = field(default_factory=dict)
    target: bool = False
    ignore: tuple[str, ...] = ()


def _image_required(node: dict) -> bool:
    return bool(node.get("image_required"))


def _generated(node: dict) -> bool:
    return node.get("image") in (None, "")


NULL_TEXT = Group({"inner_steps": count})

PROBE = Group({
    "kind": one_of("cross", "self"), "n_per_class": count, "test_fraction": fraction, "batch_size": count,
    "shard": shard, "num_inference_steps": step_count, "guidance_scale": guidance, "seeds": seeds,
    "control": boolean, "mlp.batch_size": count, "grid": count, "pool": count,
})

ABLATION = Group({
    "kind": one_of("cross", "self", "tokens"), "steps": step_window, "seeds": seeds,
    "num_inference_steps": step_count, "guidance_scale": guidance, "cell": count,
    "source_prompt": prompt(why="the source image is generated from it"), "target_prompt": prompt(),
})

GROUPS: dict[str, Group] = {
    "run": Group({"task": lambda k, v, n: v is None or one_of(*TASKS)(k, v, n), "seed": seed, "device": device,
                  "dtype": one_of(*DTYPES), "resize": resize, "threads": count, "compile": boolean,
                  "progress": boolean, "min_reconstruction_psnr": number,
                  "prompt": prompt(why="the image is generated from it")}),
    "paths": Group({"log_dir": output_dir, "cache_dir": output_dir, "output_dir": output_dir}),
    "model": Group({"steps": step_count, "guidance_scale": guidance}),
    "edit": Group({
        "image": input_image(required=_image_required), "image_required": boolean,
        "source_prompt": prompt(_generated, "the source image is generated from it"),
        "target_prompt": prompt(), "warmup": boolean, "cell": count,
    }),
    "null_text": NULL_TEXT,
    "method": Group({
        "num_inference_steps": step_count, "guidance_scale": guidance, "source_guidance_scale": guidance,
        "inversion_guidance_scale": guidance, "image_guidance_scale": guidance,
        "source_num_inference_steps": step_count, "inversion_steps": step_count,
        "self_replace_steps": step_window, "cross_replace_steps": step_window, "feature_steps": step_window,
        "attn_steps": step_window, "strength": fraction, "inpaint_strength": fraction,
        "mask_encode_strength": fraction, "inversion_cache": output_dir,
    }, target=True, ignore=("name",)),
    "data": Group({"limit": count, "pairs_per_kind": count, "seed": seed, "path": input_file,
                   "allow_absolute_paths": boolean}, target=True),
    "benchmark": Group({"table": one_of("table4", "table5"), "root": output_dir, "out_dir": output_dir,
                        "shard": shard, "panel_images": count, "compare_paper": boolean}),
    "metrics": Group({"clip": anything, "structure": anything}),  # read when given (+metrics.clip=... too)
    "probe": PROBE,
    "ablation": ABLATION,
    "attention_maps": Group({"components": count, "num_inference_steps": step_count, "guidance_scale": guidance}),
    "claims": Group({"probe.n_per_class": count, "probe.test_fraction": fraction, "probe.seeds": seeds,
                     "edits.seeds": seeds, "edits.token_seeds": seeds, "edits.batch_size": count,
                     "edits.bootstrap": count, "edits.grid_cases": count, "edits.cell": count}),
    "eval": Group({"per_combo": count, "num_inference_steps": step_count, "guidance_scale": guidance,
                   "seed": seed, "batch": count, "threads": count}),
    "toy_edit": Group({"n": count, "grid_rows": count}),
    "toy": Group({"seed": seed, "threads": count, "num_inference_steps": step_count, "guidance_scale": guidance,
                  "output_dir": output_dir, "work_dir": output_dir, "unet.padding_dropout": fraction,
                  "unet.padding_source": one_of("empty", "other"), "unet.sink_target": fraction,
                  "unet.from_scratch": boolean}),
    "toy_clip": Group({"seed": seed, "threads": count, "batch": count, "output_dir": output_dir,
                       "work_dir": output_dir}),
    "app": Group({"host": anything, "port": count, "share": boolean, "open_browser": boolean, "warmup": boolean,
                  "max_map_side": count, "display_size": count, "components": count, "alpha": fraction,
                  "self_layer": count, "clip": anything, "methods": anything, "probe_root": anything,
                  "paper_dir": anything, "prompt": anything, "source_prompt": anything, "target_prompt": anything}),
    "target": Group(target=True),  # any other `_target_` node: its keys are its target's arguments
    "trainer": Group(target=True),
    "logger": Group(target=True),
}

# Where each group sits in the run config: dotted paths, ``*`` = any one key, "" = the top level.
MOUNTS: dict[str, str] = {
    "": "run", "paths": "paths", "model": "model", "model.pipeline": "target",
    "edit": "edit", "edit.null_text": "null_text", "method": "method", "method.null_text": "null_text",
    "data": "data", "benchmark": "benchmark", "metrics": "metrics",
    "probe": "probe", "ablation": "ablation", "attention_maps": "attention_maps",
    "claims": "claims", "claims.probes.*": "probe", "claims.ablations.*": "ablation", "claims.checkers.*": "target",
    "eval": "eval", "toy_edit": "toy_edit", "toy": "toy", "toy_clip": "toy_clip",
    "trainer": "trainer", "logger": "logger", "app": "app",
}

# What each task reads besides the settings every run has (RUN_READS): a key set on the command line
# outside these is not read by the run (an error, not a silent no-op).
RUN_READS = ("task", "seed", "device", "dtype", "compile", "progress", "resize", "threads", "min_reconstruction_psnr",
             "paths", "model", "hydra")
TASK_READS: dict[str, tuple[str, ...]] = {
    "probe": ("probe", "trainer", "logger"),
    "edit": ("edit", "method"),
    "attention_maps": ("attention_maps", "prompt"),
    "ablation": ("ablation",),
    "benchmark": ("method", "data", "metric", "metrics", "benchmark", "logger"),
    "merge": ("metrics", "benchmark"),
    "claims": ("claims", "trainer"),
    "eval_toy": ("eval",),
    "eval_toy_edit": ("toy_edit", "method"),
    "train_toy": ("toy", "logger"),
    "train_toy_clip": ("toy_clip", "logger"),
    "app": ("app",),
}


# -------------------------------------------------------------------------------------- traversal

def _get(node, parts: list[str]):
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return _MISSING
        node = node[p]
    return node


_MISSING = object()


def mounted(plain: dict) -> Iterator[tuple[str, Group, dict]]:
    """(path, group, node) of every group node present in the plain config ``plain``."""
    for mount, name in MOUNTS.items():
        parts = mount.split(".") if mount else []
        for path, node in _expand(plain, parts, []):
            if isinstance(node, dict):
                yield ".".join(path), GROUPS[name], node


def _expand(node, parts: list[str], path: list[str]):
    if not parts:
        yield path, node
        return
    head, rest = parts[0], parts[1:]
    if not isinstance(node, dict):
        return
    keys = list(node) if head == "*" else ([head] if head in node else [])
    for k in keys:
        yield from _expand(node[k], rest, [*path, str(k)])


def target_parameters(target_path: str, key: str) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters of ``_target_`` (None when it takes any keyword); a target that cannot be
    imported is a UserError naming ``key``."""
    from hydra.utils import get_object

    try:
        target = get_object(target_path)
    except Exception as e:  # noqa: BLE001 - any import failure is the same one-line error
        raise UserError(f"{key} {target_path!r} cannot be imported ({first_line(e)})") from None
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_target(path: str, group: Group, node: dict) -> None:
    """Every key of a ``_target_`` node is a keyword of its target, and every keyword-only one without a
    default is given (the YAML is the only place the defaults live)."""
    what = f"{path} {node.get('name')!r}" if node.get("name") else path
    if "_target_" not in node:
        if group.ignore:  # a method without a function
            raise UserError(f"{what} has no _target_: give the editor's function (with _partial_: true) or class, "
                            f"e.g. _target_: editing.fpe.edit_fpe")
        return
    params = target_parameters(str(node["_target_"]), f"{what}: _target_")
    if params is None:
        return
    given = [k for k in node if k not in HYDRA_KEYS and k not in group.ignore]
    unknown = [k for k in given if k not in params]
    if unknown:
        names = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY] or list(params)
        settings = ", ".join(names[:SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")
        raise UserError(f"{path}.{unknown[0]} is not a setting of {what}; settings: {settings}")
    missing = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty and k not in node]
    if missing:
        raise UserError(f"{what} lacks the setting(s) {', '.join(missing)}")


def reads(task: str) -> set[str]:
    """The top-level nodes a run of ``task`` reads."""
    return set(RUN_READS) | set(TASK_READS.get(task, ()))


def check(plain: dict, task: str) -> None:
    """Every setting a run of ``task`` reads in the plain (resolved) config ``plain``, by the schema of its
    group (the groups the task does not read are left alone: a key set in one of them is refused as unread)."""
    read = reads(task)
    for path, group, node in mounted(plain):
        if path and path.split(".")[0] not in read:
            continue
        prefix = f"{path}." if path else ""
        for rel, rule in group.keys.items():
            value = _get(node, rel.split("."))
            if value is not _MISSING:
                rule(prefix + rel, value, node)
        if group.target:
            check_target(path, group, node)


# ------------------------------------------------------------------------------ keys of the command line

def group_at(path: str) -> tuple[str, Group, str] | None:
    """(mount path, group, path inside the group) of the dotted ``path``: the deepest mount above it."""
    parts = path.split(".")
    best = None
    for mount, name in MOUNTS.items():
        m = mount.split(".") if mount else []
        if len(m) < len(parts) and all(a in ("*", b) for a, b in zip(m, parts)):
            if best is None or len(m) > len(best[0].split(".") if best[0] else []):
                best = (".".join(parts[:len(m)]), GROUPS[name], ".".join(parts[len(m):]))
    return best


def can_add(path: str, plain: dict) -> bool:
    """Whether a run reads the key ``path`` that no YAML file sets (``+path=value``): a path its group's
    schema names, or a keyword of the ``_target_`` node it is set on."""
    found = group_at(path)
    if found is None:
        return False
    mount, group, rel = found
    if rel in group.keys:
        return True
    node = _get(plain, mount.split(".")) if mount else plain
    if not group.target or "." in rel or not isinstance(node, dict) or "_target_" not in node:
        return False
    try:
        params = target_parameters(str(node["_target_"]), f"{mount}._target_")
    except UserError:
        return False
    return params is None or rel in params


def unread_keys(task: str, added: list[str], set_keys: list[str], plain: dict) -> list[str]:
    """Keys of the command line the run does not read: ``added`` (``+key``) that :func:`can_add` refuses,
    and ``set_keys`` (``key=value``) outside the nodes the task reads (:data:`TASK_READS`)."""
    read = reads(task)
    out = [k for k in added if k.split(".")[0] not in read or not can_add(k, plain)]
    out += [k for k in set_keys if k.split(".")[0] not in read and k not in out]
    return out
