"""Response times of the attention explorer, as a user meets them: the page served on the configured model
(in this process, on a free local port), every interaction called through its HTTP API with gradio_client
(the round trip: queue, model, pictures, download of every image), ``--rounds`` times each after one warm-up.

``python -m experiments.app.measure [--rounds 5] [--photo img.jpg] [--probe-run <folder>] [overrides ...]``
prints one Markdown table (median, min, max seconds per interaction) and the machine it ran on; the
overrides are the CLI's (``model=tiny``, ``device=cuda``, ``threads=1`` ...).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable

from sdattn.env import set_process_defaults


def interactions(c, backend, photo: str | None, probe_run: str | None) -> dict[str, Callable[[int], object]]:
    """{what the user does: call(round)}; each round uses another seed so nothing is cached."""
    from gradio_client import handle_file

    s = backend.settings
    cross = [i for _, i in backend.layer_choices("cross")]
    last = backend.num_steps - 1
    self_layers = [i for _, i in backend.layer_choices("self")]

    def generate(r):
        return c.predict(s["prompt"], r, cross, 0, last, "mean", int(s["self_layer"]), 0, last, "mean", 6,
                         api_name="/generate")

    calls = {
        "Maps: Generate (sample + every map)": generate,
        "Maps: cross layers / steps / head changed": lambda r: c.predict(cross[-2:], r % backend.num_steps, last,
                                                                         str(r % 2), api_name="/cross_maps"),
        "Maps: self layer changed (re-sampled)": lambda r: c.predict(self_layers[r % len(self_layers)], 0, last,
                                                                     "mean", 6, api_name="/self_maps"),
        "Maps: number of components changed": lambda r: c.predict(3 + r % 4, api_name="/components"),
        "Maps: pixel clicked": lambda r: c.predict((r % 10) / 10, 0.5, api_name="/pixel"),
        "Edit: FPE, generated pair": lambda r: c.predict(s["source_prompt"], s["target_prompt"], r, None, ["fpe"],
                                                         "", api_name="/edit"),
        "Edit: FPE + MasaCtrl + P2P grid": lambda r: c.predict(s["source_prompt"], s["target_prompt"], r, None,
                                                               ["fpe", "masactrl", "p2p"], "", api_name="/edit"),
        "Bad word → error line": lambda r: _error(lambda: c.predict("a unicorn", r, cross, 0, last, "mean", 6, 0, last,
                                                                    "mean", 6, api_name="/generate")),
    }
    if photo:
        calls["Edit: FPE, uploaded photo"] = lambda r: c.predict("", s["target_prompt"], r, handle_file(photo),
                                                                 ["fpe"], "", api_name="/edit")
    if probe_run:
        calls["Probe results: open a run"] = lambda r: c.predict(None, probe_run, api_name="/probe")
    return calls


def server_times(result) -> tuple[float | None, float | None]:
    """(wall, CPU) seconds the page's handler reported in its status line ("... in 1.23 s (CPU 0.98 s)")."""
    texts = [x for x in (result if isinstance(result, tuple) else (result,)) if isinstance(x, str)]
    m = next((m for x in texts if (m := re.search(r"in ([\d.]+) s \(CPU ([\d.]+) s\)", x))), None)
    return (float(m[1]), float(m[2])) if m else (None, None)


def number(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _error(call):
    from gradio_client.exceptions import AppError

    try:
        call()
    except AppError:
        return
    raise AssertionError("the bad input was accepted")


def main(argv: list[str] | None = None) -> None:
    set_process_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--photo", help="an image to upload for the real-image edit")
    parser.add_argument("--probe-run", help="a finished probe run folder for the Probe tab")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch
    from gradio_client import Client

    from .backend import compose_run
    from .server import running

    with tempfile.TemporaryDirectory() as out:
        overrides = ["task=app", "app.port=null", "logger=none", f"paths.output_dir={out}", *args.overrides]
        cfg = compose_run(overrides)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        t0 = time.perf_counter()
        with running(cfg) as (page, url, backend):
            started = time.perf_counter() - t0
            client = Client(url, verbose=False, download_files=out)
            rows = []
            for what, call in interactions(client, backend, args.photo, args.probe_run).items():
                call(0)  # warm-up: first compose of a method, first CLIP load, first picture
                times, server = [], []
                for r in range(1, args.rounds + 1):
                    t = time.perf_counter()
                    result = call(r)
                    times.append(time.perf_counter() - t)
                    server.append(server_times(result))
                rows.append((what, statistics.median(times), min(times), max(times),
                             *(statistics.median(x) if None not in x else None for x in zip(*server))))
                print(f"{what}: median {rows[-1][1]:.2f} s", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"\nmodel {cfg.model.name} on {cfg.device} ({platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"load average {load[0]:.1f} at the end), {cfg.dtype}, {cfg.model.steps} steps, torch threads "
          f"{torch.get_num_threads()}; page up {started:.1f} s after the model config (load, warm-up, launch); "
          f"{args.rounds} rounds after a warm-up, round trip through gradio_client (images downloaded); "
          "in the handler: what the page's status line reports (CPU: this process, all its threads)\n")
    print("| interaction | round trip, median s | min s | max s | in the handler: wall s | CPU s |\n"
          "|---|---|---|---|---|---|")
    for what, med, lo, hi, wall, cpu in rows:
        print(f"| {what} | {med:.2f} | {lo:.2f} | {hi:.2f} | {number(wall)} | {number(cpu)} |")


if __name__ == "__main__":
    main()
