"""Benchmarks: ``python -m experiments.bench <command> [options] [hydra overrides]``.

``edit``: time and peak memory of an FPE edit relative to plain sampling of the same two-image
batch, and of FPE on a real image relative to VAE-encode + DDIM inversion + the same sampling.

``capture``: time and peak memory of sampling with attention capture (cross capture of the probe's
default words and layers, ``probe.layers``; self capture of the same layer indices) relative to
plain sampling of the same batch (``--prompts`` probe prompts, ``model.steps`` DDIM steps, no
decoding — exactly what :func:`probing.capture.capture_features` samples).

Method: each variant runs in a fresh subprocess (so allocator caches and high-water marks never
leak between variants) that loads the model, runs one warm-up sampling call, then times
``--repeats`` calls (median). Peak memory covers the warm-up and the timed calls:

- CUDA: ``torch.cuda.max_memory_allocated`` (tensors PyTorch allocated; the caching allocator's
  reserve is not counted). "sampling" = peak − memory allocated after loading the model.
- CPU: the process's peak resident set size. The kernel's high-water mark (``VmHWM``) is reset
  after loading (``/proc/self/clear_refs``) so load-time transients do not hide the sampling peak;
  where that is not possible, ``getrusage(RUSAGE_SELF).ru_maxrss`` is used and the table says so.
  "sampling" = peak − RSS after loading. RSS counts pages, not tensors: the interpreter, libraries
  and weights are in "peak", and freed memory the allocator keeps can inflate it.

Ratios are variant ÷ plain; on a shared CPU the time ratios carry the noise of the neighbours.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CAPTURE_VARIANTS = ("plain", "cross", "self")
_RESULT = "BENCH-RESULT "


def compose_config(model: str | None, overrides: list[str]):
    """configs/run.yaml composed with ``model=<model>`` (if given) and Hydra ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import experiments.run  # noqa: F401  (registers the project_root resolver)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base="1.3"):
        cfg = compose("run", overrides=([f"model={model}"] if model else []) + list(overrides))
    GlobalHydra.instance().clear()
    return cfg


# Memory probes --------------------------------------------------------------------------------

def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


class _MemoryProbe:
    """Peak memory of what runs between :meth:`start` and :meth:`stop` (see the module docstring)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.method = "cuda max_memory_allocated" if self.cuda else "VmHWM (reset after load)"

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.base = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_status()["VmRSS"]
        except OSError:
            import resource

            self.method = "ru_maxrss (not reset: includes model loading)"
            self.base = _proc_status()["VmRSS"] if Path("/proc/self/status").exists() else 0
            self._rusage = resource

    def stop(self) -> tuple[int, int]:
        """(peak bytes, peak − bytes at start)."""
        if self.cuda:
            self.torch.cuda.synchronize()
            peak = self.torch.cuda.max_memory_allocated()
        elif hasattr(self, "_rusage"):
            peak = self._rusage.getrusage(self._rusage.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        else:
            peak = _proc_status()["VmHWM"]
        return peak, peak - self.base


# capture ---------------------------------------------------------------------------------------

def _capture_setup(cfg, n_prompts: int):
    """The batch and capture settings the capture benchmark uses, from the probe config."""
    from omegaconf import OmegaConf

    from experiments.tasks.probe import family_path
    from probing.capture import CaptureSpec
    from probing.prompts import build_prompts, load_family, resolve_token

    p = cfg.probe
    family = load_family(family_path(cfg))
    per_class = max(2, -(-n_prompts // len(family["classes"])))
    prompts = sorted(build_prompts(family, per_class), key=lambda x: x.seed)[:n_prompts]  # one per class first
    tokens = list(p.tokens) or ["{cls}"]
    words = [[resolve_token(t, x) for t in tokens] for x in prompts]
    layers = OmegaConf.to_object(p.layers) if OmegaConf.is_config(p.layers) else p.layers
    specs = {"cross": CaptureSpec(kind="cross", tokens=tokens, steps=p.steps, grid=p.grid, pool=p.pool),
             "self": CaptureSpec(kind="self", tokens=[], steps=p.steps, grid=p.grid, pool=p.pool)}
    return prompts, words, layers, specs


def measure_capture_variant(pipe, cfg, variant: str, n_prompts: int = 8, steps: int | None = None,
                            repeats: int = 1) -> dict:
    """Warm up, then time ``repeats`` sampling calls of one variant on ``pipe``; returns the measurements."""

    from probing.capture import capture_features
    from sdattn.layers import LayerSelector, enumerate_layers
    from sdattn.sampling import latent_size, sample

    steps = steps or int(cfg.model.steps)
    guidance = float(cfg.model.guidance_scale)
    prompts, words, indices, specs = _capture_setup(cfg, n_prompts)
    texts, seeds = [x.prompt for x in prompts], [x.seed for x in prompts]
    if variant == "plain":
        def call():
            sample(pipe, texts, seeds, num_inference_steps=steps, guidance_scale=guidance, progress=False,
                   decode_images=False)
    else:
        spec = specs[variant]
        layers = LayerSelector(kinds=spec.kind, indices=indices).select(enumerate_layers(pipe.unet, latent_size(pipe)))

        def call():
            capture_features(pipe, layers, spec, texts, seeds, words if spec.kind == "cross" else None,
                             num_inference_steps=steps, guidance_scale=guidance)
    return _measure(pipe, call, repeats) | {
        "variant": variant, "model": str(cfg.model.name), "steps": steps, "prompts": len(texts),
        "layers": indices if isinstance(indices, str) else [int(i) for i in indices]}


def _measure(pipe, call, repeats: int) -> dict:
    """Peak memory over a warm-up call and ``repeats`` timed calls; median time."""
    import torch

    device = pipe.unet.device
    probe = _MemoryProbe(device)
    probe.start()
    call()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak, extra = probe.stop()
    return {"seconds": statistics.median(times), "peak": peak, "extra": extra, "method": probe.method,
            "device": str(device)}


# edit ------------------------------------------------------------------------------------------

EDIT_VARIANTS = ("plain", "fpe", "invert+sample", "fpe_real")
EDIT_BASELINE = {"plain": "plain", "fpe": "plain", "invert+sample": "invert+sample", "fpe_real": "invert+sample"}


def measure_edit_variant(pipe, cfg, variant: str, steps: int | None = None, repeats: int = 1) -> dict:
    """One editing variant on the model's example prompts (``model.examples.edit_*``):
    ``plain``: sampling the two-image batch [source, target] from one seed (decoded);
    ``fpe``: FPE (Alg. 1, preset ``edit.layers``, else ``model.fpe_layers``) of the same pair;
    ``invert+sample``: VAE-encode + DDIM inversion + sampling the two-image batch from the inverted latent;
    ``fpe_real``: FPE on a real image (Alg. 2) — a fixed random image of the model's size."""
    import torch

    from editing.fpe import fpe_generated, fpe_real
    from editing.inversion import ddim_invert, image_size
    from sdattn.sampling import encode_image, initial_latents, sample

    steps = steps or int(cfg.model.steps)
    guidance = float(cfg.model.guidance_scale)
    src, tgt = str(cfg.model.examples.edit_source), str(cfg.model.examples.edit_target)
    layers = str(cfg.edit.layers) if cfg.get("edit") else str(cfg.model.fpe_layers)
    image = torch.rand((1, 3, *image_size(pipe)), generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, progress=False)
    calls = {
        "plain": lambda: sample(pipe, [src, tgt], latents=initial_latents(pipe, [0]).repeat(2, 1, 1, 1), **kw),
        "fpe": lambda: fpe_generated(pipe, src, tgt, 0, layers=layers, **kw),
        "invert+sample": lambda: sample(
            pipe, ["", tgt],
            latents=ddim_invert(pipe, encode_image(pipe, image), "", steps, False)[-1].repeat(2, 1, 1, 1), **kw),
        "fpe_real": lambda: fpe_real(pipe, image, tgt, layers=layers, **kw),
    }
    return _measure(pipe, calls[variant], repeats) | {
        "variant": variant, "model": str(cfg.model.name), "steps": steps, "prompts": 2, "layers": layers}


def _run_variant(args) -> dict:
    """The ``_variant`` worker: load the model in this (fresh) process and measure one variant."""
    import torch

    from experiments.common import load_model

    torch.set_num_threads(args.threads)
    cfg = compose_config(args.model, args.overrides)
    if args.command == "_edit_variant":
        return measure_edit_variant(load_model(cfg), cfg, args.variant, args.steps, args.repeats)
    return measure_capture_variant(load_model(cfg), cfg, args.variant, args.prompts, args.steps, args.repeats)


def _spawn(args, variant: str, worker: str = "_variant") -> dict:
    cmd = [sys.executable, "-m", "experiments.bench", worker, "--variant", variant, *_shared_argv(args)]
    r = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    lines = [x for x in r.stdout.splitlines() if x.startswith(_RESULT)]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: the {variant!r} run failed (exit {r.returncode}): {tail}")
    return json.loads(lines[-1][len(_RESULT):])


def format_capture_table(rows: list[dict], baselines: dict[str, str] | None = None) -> str:
    """A plain-text table; ratios are relative to each row's baseline row (default ``plain``)."""
    by_name = {r["variant"]: r for r in rows}
    mib = 2 ** 20
    w = max(8, *(len(r["variant"]) + 1 for r in rows))
    head = f"{'variant':<{w}}{'time s':>9}{'× base':>9}{'peak MiB':>11}{'× base':>9}{'sampling MiB':>14}{'× base':>9}"
    out = [head]
    for r in rows:
        base = by_name[(baselines or {}).get(r["variant"], "plain")]
        extra_ratio = r["extra"] / base["extra"] if base["extra"] > 0 else float("nan")
        out.append(f"{r['variant']:<{w}}{r['seconds']:>9.3f}{r['seconds'] / base['seconds']:>9.2f}"
                   f"{r['peak'] / mib:>11.1f}{r['peak'] / base['peak']:>9.2f}{r['extra'] / mib:>14.1f}"
                   f"{extra_ratio:>9.2f}")
    return "\n".join(out)


def cmd_capture(args) -> list[dict]:
    """Run plain / cross / self in fresh subprocesses and print the table."""
    rows = [_spawn(args, v) for v in CAPTURE_VARIANTS]
    r0 = rows[0]
    print(f"capture benchmark: model {r0['model']} on {r0['device']}, {r0['prompts']} prompts × {r0['steps']} "
          f"DDIM steps (CFG), probe layers {r0['layers']}; median of {args.repeats} after 1 warm-up; "
          f"memory: {r0['method']}; torch threads {args.threads}")
    print(format_capture_table(rows))
    return rows


def cmd_edit(args) -> list[dict]:
    """Run plain / fpe / invert+sample / fpe_real in fresh subprocesses and print the table."""
    rows = [_spawn(args, v, "_edit_variant") for v in EDIT_VARIANTS]
    r0 = rows[0]
    print(f"edit benchmark: model {r0['model']} on {r0['device']}, one source/target pair × {r0['steps']} DDIM "
          f"steps (CFG), FPE layers {r0['layers']}; median of {args.repeats} after 1 warm-up; memory: "
          f"{r0['method']}; torch threads {args.threads}. Baselines: fpe ÷ plain, fpe_real ÷ invert+sample")
    print(format_capture_table(rows, EDIT_BASELINE))
    return rows


def _add_shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model config (configs/model/*.yaml); default: run.yaml's")
    p.add_argument("--prompts", type=int, default=8, help="prompts in the batch (default 8)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's model.steps)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. device=cuda probe.layers=[3,14]")


def _shared_argv(args) -> list[str]:
    argv = ["--prompts", str(args.prompts), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    argv += ["--model", args.model] if args.model else []
    argv += ["--steps", str(args.steps)] if args.steps else []
    return argv + ["--", *args.overrides]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{capture,edit}")

    p = sub.add_parser("capture", help="time / peak memory of attention capture vs plain sampling")
    _add_shared(p)
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("edit", help="time / peak memory of FPE vs plain sampling, FPE-real vs inversion + sampling")
    _add_shared(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("_edit_variant")  # internal: one editing variant, in a fresh process
    _add_shared(p)
    p.add_argument("--variant", choices=EDIT_VARIANTS, required=True)
    p.set_defaults(func=lambda a: print(_RESULT + json.dumps(_run_variant(a)), flush=True))

    p = sub.add_parser("_variant")  # internal (no help, so not listed): one capture variant, in a fresh process
    _add_shared(p)
    p.add_argument("--variant", choices=CAPTURE_VARIANTS, required=True)
    p.set_defaults(func=lambda a: print(_RESULT + json.dumps(_run_variant(a)), flush=True))
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.prompts < 1 or args.repeats < 1 or args.threads < 1 or (args.steps is not None and args.steps < 1):
        raise SystemExit("error: --prompts, --repeats, --threads and --steps must be ≥ 1")
    from sdattn.errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
