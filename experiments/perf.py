"""Speed and memory: ``python -m experiments.perf {edit,capture,all} [options] [hydra overrides]``.

``edit``: one source/target pair (``model.examples.edit_*``), one seed, ``model.steps`` DDIM steps with
CFG, all decoded to images:

- ``diffusers``: diffusers' own ``StableDiffusionPipeline`` (same components, a DDIM scheduler from the
  model's config, the two prompts, the same initial latent, ``output_type="pt"``: full, decoded) —
  what a user would pick instead of our sampler;
- ``plain``: our sampler (:func:`sdattn.sampling.sample`) on [source, target];
- ``fpe``: FPE on generated images (Alg. 1; its settings: ``configs/method/fpe.yaml``, e.g. ``method.layers``);
- ``invert+sample``: VAE-encode + DDIM inversion + sampling [source, target] from the inverted latent;
- ``fpe_real``: FPE on a real image (Alg. 2), a fixed random image of the model's size.

``capture``: ``--prompts`` probe prompts, no decoding (what :func:`probing.capture.capture_features`
samples): ``plain`` sampling, ``cross`` capture (the probe's words and ``probe.layers``), ``self`` capture
(the same layer indices). ``all``: both groups in the same process.

Method: everything runs in ONE process on one loaded model. Each variant runs once to warm up, then
``--rounds`` rounds run every variant once, in an order rotated each round (so drifts of a shared
machine hit all variants alike). Time: median over the rounds (CUDA synchronised before and after each
call); the ratio of a variant to its baseline is the median of the per-round ratios (paired, so a slow
round slows both), with the range over rounds. On CPU also the calling thread's CPU time
(``time.thread_time``; with one torch thread the work runs in the caller), which a busy shared
machine disturbs far less than wall time. Memory, per call, max over the rounds:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors PyTorch
  allocated, not the caching allocator's reserve); "extra" = peak − memory allocated before the call.
- CPU: peak resident set size (RSS, ``/proc/self/statm``) sampled every millisecond by a thread during
  the call; "extra" = peak − RSS before the call. glibc's malloc is told to give freed blocks above
  128 KiB back to the system at once (``mallopt``), so RSS follows the live tensors rather than the
  allocator's cache. RSS still counts the interpreter, libraries and weights ("peak") and can miss a
  peak shorter than the sampling interval.

Lock-step (CPU, not compiled; ``--lockstep`` pairs per variant, 0 = off): the sequential rounds
above cannot resolve a few per cent on a shared VM whose speed drifts ±30 % between seconds, so each
variant is also run against its baseline in lock-step (:mod:`experiments.interleave`): two threads
take turns at every UNet call, the variant on a twin pipeline sharing the weights, each timed by its
own thread CPU time. "lock-step × baseline" is the median of those pairs' ratios (with the range);
it is the number to read for small differences on CPU (FPE vs plain).

Writes ``<out>/perf_<command>_<model>_<device>.json`` and ``.md`` (atomically) and prints the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

EDIT_VARIANTS = ("diffusers", "plain", "fpe", "invert+sample", "fpe_real")
CAPTURE_VARIANTS = ("plain", "cross", "self")
# baseline of each variant (ratios are variant ÷ baseline)
EDIT_BASELINE = {"diffusers": "plain", "plain": "plain", "fpe": "plain", "invert+sample": "plain",
                 "fpe_real": "invert+sample"}
CAPTURE_BASELINE = {"plain": "plain", "cross": "plain", "self": "plain"}


def compose_config(model: str | None, overrides: list[str]):
    """configs/run.yaml composed with ``model=<model>`` (if given) and Hydra ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import experiments.run  # noqa: F401  (registers the project_root resolver)

    GlobalHydra.instance().clear()
    from sdattn.files import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("run", overrides=([f"model={model}"] if model else []) + list(overrides))
    GlobalHydra.instance().clear()
    return cfg


# Memory ----------------------------------------------------------------------------------------

def _rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory_at_once() -> bool:
    """glibc: freed blocks ≥ 128 KiB go back to the system at once (fixed mmap threshold, trim
    threshold), so RSS follows live memory. False where there is no glibc ``mallopt``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024) and libc.mallopt(m_trim_threshold, 128 * 1024))


class PeakMemory:
    """Peak memory of one call: ``with PeakMemory(device) as m: ...`` → ``m.peak``, ``m.extra`` (bytes)."""

    def __init__(self, device, interval: float = 0.001):
        import torch

        self.torch, self.cuda, self.interval = torch, device.type == "cuda", interval
        self.method = "cuda max_memory_allocated" if self.cuda else "peak RSS (sampled every 1 ms)"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.base = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
            return self
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


# Variants --------------------------------------------------------------------------------------

def edit_calls(pipe, cfg, steps: int) -> dict[str, Callable[[], object]]:
    """The editing variants (see the module docstring) as argument-free calls."""
    import torch
    from diffusers import StableDiffusionPipeline

    from editing.fpe import fpe_generated, fpe_real
    from editing.inversion import ddim_invert, image_size
    from experiments.common import method_config
    from sdattn.sampling import ddim_scheduler, encode_image, initial_latents, sample

    guidance = float(cfg.model.guidance_scale)
    src, tgt = str(cfg.model.examples.edit_source), str(cfg.model.examples.edit_target)
    settings = method_config(cfg, "fpe")  # configs/method/fpe.yaml (with method.* overrides when method=fpe)
    fpe = {k: settings[k] for k in ("layers", "self_replace_steps")}
    image = torch.rand((1, 3, *image_size(pipe)), generator=torch.Generator().manual_seed(0))
    z = initial_latents(pipe, [0]).repeat(2, 1, 1, 1)
    components = {**pipe.components, "scheduler": ddim_scheduler(pipe)}
    reference = StableDiffusionPipeline(**components, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, progress=False)

    def inverted():  # (1, C, h, w): z_T of the image, inverted with the empty prompt
        return ddim_invert(pipe, encode_image(pipe, image), "", steps, False)[-1]

    return {
        "diffusers": lambda: reference(prompt=[src, tgt], latents=z.to(pipe.unet.device, pipe.unet.dtype),
                                       num_inference_steps=steps, guidance_scale=guidance, output_type="pt").images,
        "plain": lambda: sample(pipe, [src, tgt], latents=z, **kw).images,
        "fpe": lambda: fpe_generated(pipe, src, tgt, 0, **fpe, **kw),
        "invert+sample": lambda: sample(pipe, ["", tgt], latents=inverted().repeat(2, 1, 1, 1), **kw),
        "fpe_real": lambda: fpe_real(pipe, image, tgt, **fpe, **kw),
    }


def _capture_setup(cfg, n_prompts: int):
    """The batch and capture settings the capture variants use, from the probe config."""
    from omegaconf import OmegaConf

    from probing.capture import CaptureSpec
    from probing.prompts import build_prompts, family_file, load_family, resolve_token

    p = cfg.probe
    family = load_family(family_file(str(p.family), cfg.paths.data_dir))
    per_class = max(2, -(-n_prompts // len(family["classes"])))
    prompts = sorted(build_prompts(family, per_class), key=lambda x: x.seed)[:n_prompts]  # one per class first
    tokens = list(p.tokens) or ["{cls}"]
    words = [[resolve_token(t, x) for t in tokens] for x in prompts]
    layers = OmegaConf.to_object(p.layers) if OmegaConf.is_config(p.layers) else p.layers
    specs = {"cross": CaptureSpec(kind="cross", tokens=tokens, steps=p.steps, grid=p.grid, pool=p.pool),
             "self": CaptureSpec(kind="self", tokens=[], steps=p.steps, grid=p.grid, pool=p.pool)}
    return prompts, words, layers, specs


def capture_calls(pipe, cfg, steps: int, n_prompts: int) -> tuple[dict[str, Callable[[], object]], object]:
    """The capture variants as argument-free calls, and the probe layer indices they use."""
    from probing.capture import capture_features
    from sdattn.layers import enumerate_layers, select_layers
    from sdattn.sampling import latent_size, sample

    guidance = float(cfg.model.guidance_scale)
    prompts, words, indices, specs = _capture_setup(cfg, n_prompts)
    texts, seeds = [x.prompt for x in prompts], [x.seed for x in prompts]
    all_layers = enumerate_layers(pipe.unet, latent_size(pipe))

    def capture(kind):
        spec = specs[kind]
        layers = select_layers(all_layers, indices, kind)
        return lambda: capture_features(pipe, layers, spec, texts, seeds, words if kind == "cross" else None,
                                        num_inference_steps=steps, guidance_scale=guidance)

    calls = {"plain": lambda: sample(pipe, texts, seeds, num_inference_steps=steps, guidance_scale=guidance,
                                     progress=False, decode_images=False),
             "cross": capture("cross"), "self": capture("self")}
    return calls, indices


# Measuring -------------------------------------------------------------------------------------

def measure_rounds(calls: dict[str, Callable[[], object]], device, rounds: int) -> dict[str, dict]:
    """Warm up every call once, then ``rounds`` rounds of every call in a rotated order.
    → {name: {"seconds": [...], "peak": [...], "extra": [...]}} in round order."""
    import torch

    names = list(calls)
    out = {n: {"seconds": [], "cpu_seconds": [], "peak": [], "extra": []} for n in names}
    for name in names:
        calls[name]()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with PeakMemory(device) as mem:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.thread_time()
                calls[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds, cpu_seconds = time.perf_counter() - t0, time.thread_time() - c0
            out[name]["seconds"].append(seconds)
            out[name]["cpu_seconds"].append(cpu_seconds)
            out[name]["peak"].append(mem.peak)
            out[name]["extra"].append(mem.extra)
    return out


def summarise(raw: dict[str, dict], baselines: dict[str, str], lockstep: dict[str, dict] | None = None) -> list[dict]:
    """Medians, per-round paired ratios to each variant's baseline (median and range), memory maxima;
    ``lockstep``: :func:`experiments.interleave.lockstep_ratios` of the variants (others: none)."""
    rows = []
    lockstep = lockstep or {}
    for name, r in raw.items():
        base = raw[baselines[name]]
        ratios = [a / b for a, b in zip(r["seconds"], base["seconds"])]
        cpu_ratios = [a / b for a, b in zip(r["cpu_seconds"], base["cpu_seconds"])]
        peak, extra = max(r["peak"]), max(r["extra"])
        base_peak, base_extra = max(base["peak"]), max(base["extra"])
        rows.append({
            "variant": name, "baseline": baselines[name],
            "seconds": statistics.median(r["seconds"]), "seconds_min": min(r["seconds"]),
            "seconds_max": max(r["seconds"]), "rounds": r["seconds"],
            "time_ratio": statistics.median(ratios), "time_ratio_min": min(ratios), "time_ratio_max": max(ratios),
            "cpu_seconds": statistics.median(r["cpu_seconds"]), "cpu_ratio": statistics.median(cpu_ratios),
            "cpu_ratio_min": min(cpu_ratios), "cpu_ratio_max": max(cpu_ratios),
            "peak": peak, "peak_ratio": peak / base_peak,
            "extra": extra, "extra_ratio": extra / base_extra if base_extra > 0 else float("nan"),
            "lockstep": lockstep.get(name),
        })
    return rows


def format_table(rows: list[dict], cpu: bool = False) -> str:
    """A Markdown table of the summarised rows; ``cpu``: with the calling thread's CPU time, which a
    busy shared machine disturbs far less than wall time (one torch thread runs in the caller), and
    the lock-step ratio where one was measured."""
    mib = 2 ** 20
    lock = cpu and any(r.get("lockstep") for r in rows)
    cpu_head = (" thread CPU s | × baseline (range) |" if cpu else "") + (" lock-step × baseline (range) |"
                                                                          if lock else "")
    out = [f"| variant | time s (min–max) | × baseline (range) |{cpu_head} peak MiB | × | extra MiB | × |",
           "|---|---|---|" + ("---|---|" if cpu else "") + ("---|" if lock else "") + "---|---|---|---|"]
    for r in rows:
        base = "" if r["baseline"] == r["variant"] else f" {r['baseline']}"
        cpu_cells = (f" {r['cpu_seconds']:.3f} | {r['cpu_ratio']:.3f} ({r['cpu_ratio_min']:.2f}–"
                     f"{r['cpu_ratio_max']:.2f}){base} |") if cpu else ""
        if lock:
            ls = r.get("lockstep")
            cpu_cells += (f" **{ls['ratio']:.3f}** ({ls['ratio_min']:.2f}–{ls['ratio_max']:.2f}, "
                          f"{len(ls['ratios'])} pairs) |" if ls else " – |")
        out.append(f"| {r['variant']} | {r['seconds']:.3f} ({r['seconds_min']:.3f}–{r['seconds_max']:.3f}) | "
                   f"{r['time_ratio']:.3f} ({r['time_ratio_min']:.2f}–{r['time_ratio_max']:.2f}){base} |{cpu_cells} "
                   f"{r['peak'] / mib:.0f} | {r['peak_ratio']:.3f} | {r['extra'] / mib:.1f} | "
                   f"{r['extra_ratio']:.3f} |")
    return "\n".join(out)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(args) -> dict:
    """Load the model once, measure the chosen groups, write JSON + Markdown, print the table."""
    import torch

    from experiments.common import load_model, method_config
    from experiments.outputs import check_writable

    torch.set_num_threads(args.threads)
    cfg = compose_config(args.model, args.overrides)
    out = Path(args.out or Path(cfg.paths.output_dir) / "perf")
    check_writable("--out", out)  # before the model loads
    pipe = load_model(cfg)
    device = pipe.unet.device
    released = device.type == "cuda" or release_freed_memory_at_once()
    steps = args.steps or int(cfg.model.steps)
    groups = {"edit": ["edit"], "capture": ["capture"], "all": ["edit", "capture"]}[args.command]
    result = {"command": args.command, "model": str(cfg.model.name), "device": str(device),
              "dtype": str(pipe.unet.dtype).removeprefix("torch."), "compile": bool(cfg.get("compile")),
              "steps": steps, "guidance_scale": float(cfg.model.guidance_scale), "rounds": args.rounds,
              "threads": args.threads, "machine": _machine(device),
              "memory": PeakMemory(device).method + ("" if released else " (malloc not told to release: noisier)"),
              "groups": {}}
    lockstep = args.lockstep if device.type == "cpu" and not result["compile"] else 0
    result["lockstep_pairs"] = lockstep
    twin = None
    for group in groups:
        if group == "edit":
            calls, baselines, extra = edit_calls(pipe, cfg, steps), EDIT_BASELINE, {"prompts": 2}
            extra["fpe_layers"] = str(method_config(cfg, "fpe")["layers"])
        else:
            calls, layers = capture_calls(pipe, cfg, steps, args.prompts)
            baselines, extra = CAPTURE_BASELINE, {"prompts": args.prompts, "layers": str(layers)}
        raw = measure_rounds(calls, device, args.rounds)
        paired = None
        if lockstep:  # after the sequential rounds, so the twin's modules never count in their memory
            from experiments.interleave import lockstep_ratios
            from sdattn.models import twin_pipeline

            twin = twin or twin_pipeline(pipe)
            twin_calls = edit_calls(twin, cfg, steps) if group == "edit" else capture_calls(twin, cfg, steps,
                                                                                           args.prompts)[0]
            unets = (pipe.unet, twin.unet)
            lockstep_ratios(calls, twin_calls, baselines, unets, 1)  # warm-up (the twin's first calls)
            paired = lockstep_ratios(calls, twin_calls, baselines, unets, lockstep)
        result["groups"][group] = {**extra, "rows": summarise(raw, baselines, paired)}
    text = render(result)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"perf_{args.command}_{result['model']}_{device.type}"
    _write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    _write_atomic(out / f"{stem}.md", text + "\n")
    print(text)
    print(f"\nwrote {out / stem}.json and .md")
    return result


def _machine(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible"


def render(result: dict) -> str:
    """The Markdown report of one run: a header line and one table per group."""
    head = (f"model {result['model']} on {result['device']} ({result['machine']}), {result['dtype']}"
            f"{', compiled' if result['compile'] else ''}, {result['steps']} DDIM steps, "
            f"CFG {result['guidance_scale']}; "
            f"median of {result['rounds']} alternating rounds after a warm-up; memory: {result['memory']}; "
            f"torch threads {result['threads']}"
            + (f"; lock-step: {result['lockstep_pairs']} pairs per variant, turns at every UNet call"
               if result.get("lockstep_pairs") else ""))
    parts = [head]
    for group, g in result["groups"].items():
        what = (f"edit: one pair, FPE layers {g['fpe_layers']}, images decoded" if group == "edit" else
                f"capture: {g['prompts']} prompts, probe layers {g['layers']}, not decoded")
        parts += ["", f"**{what}**", "", format_table(g["rows"], cpu=result["device"] == "cpu")]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.perf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{edit,capture,all}")
    for name, text in (("edit", "diffusers' pipeline, plain sampling, FPE, inversion + sampling, FPE real"),
                       ("capture", "plain sampling vs cross / self attention capture"),
                       ("all", "edit and capture from the same process")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", default=None, help="model config (configs/model/*.yaml); default: run.yaml's")
        p.add_argument("--prompts", type=int, default=8, help="capture: prompts in the batch (default 8)")
        p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's model.steps)")
        p.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up (default 5)")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        p.add_argument("--lockstep", type=int, default=5,
                       help="CPU: lock-step pairs per variant vs its baseline (default 5; 0 = off; "
                            "not with compile=true or CUDA)")
        p.add_argument("--out", default=None, help="output folder (default: <paths.output_dir>/perf)")
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. device=cuda dtype=float16 compile=true")
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.prompts < 1 or args.rounds < 1 or args.threads < 1 or (args.steps is not None and args.steps < 1):
        _fail("--prompts, --rounds, --threads and --steps must be ≥ 1")
    if args.lockstep < 0:
        _fail(f"--lockstep {args.lockstep}: allowed an integer ≥ 0 (0 = no lock-step pairs)")
    if args.lockstep and args.threads != 1:
        _fail(f"--lockstep needs --threads 1 (got {args.threads}): its CPU time is the calling thread's; "
              "give --lockstep 0 to time with more threads")
    from sdattn.errors import UserError

    try:
        return run(args)
    except UserError as e:
        _fail(str(e))


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
