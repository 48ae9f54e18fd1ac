"""The attention explorer's page (Gradio): Maps, Edit and Probe results.

Everything the page asks of the model goes through :class:`experiments.app.backend.Backend`; this module
only lays out the page, turns its numbers into pictures (:mod:`experiments.app.render`) and turns a bad
input into the one-line error shown in the page (the server keeps serving).
"""

from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Callable

import gradio as gr
import yaml

from . import render
from .backend import Backend, Recording, UserError, first_line
from .probe_results import find_probe_runs, read_probe_run

TITLE = "sdattn — attention explorer"
# System fonts only: the page loads nothing from outside (offline, and no third party sees who uses it).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def guarded(fn: Callable) -> Callable:
    """Bad input (a :class:`UserError`) → its one line in the page; anything else → one line naming the
    exception, the traceback on the console. Either way the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(f"error: {first_line(e)}", print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the page stays up whatever a handler hits
            traceback.print_exc()
            raise gr.Error(f"error: internal: {type(e).__name__}: {first_line(e)}", print_exception=False) from None

    return wrapper


def heads_choices(n: int) -> list[str]:
    return ["mean", *(str(i) for i in range(n))]


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def started() -> tuple[float, float]:
    """(wall clock, this process's CPU time) now, for :func:`timed`."""
    return time.perf_counter(), time.process_time()


def timed(what: str, t0: tuple[float, float]) -> str:
    """``what`` with the time it took since ``t0``: wall clock, and CPU time of this process (all its threads:
    what the interaction costs without other programs competing for the CPU)."""
    return f"{what} in {time.perf_counter() - t0[0]:.2f} s (CPU {time.process_time() - t0[1]:.2f} s)"


def build(backend: Backend) -> gr.Blocks:
    """The page on ``backend``'s model (not launched)."""
    s = backend.settings
    size, alpha = int(s["display_size"]), float(s["alpha"])
    last = backend.num_steps - 1

    # ------------------------------------------------------------------ maps
    def word_gallery(rec: Recording, layers, lo, hi, head) -> list:
        maps = backend.cross_maps(rec, [int(i) for i in layers or []], (lo, hi), head)
        base = render.upscale(rec.image, size)
        return [(render.overlay(base, m, alpha), w) for w, m in zip(rec.words, maps)]

    def self_gallery(rec: Recording, k) -> list:
        comps, sigma = backend.self_components(rec, int(k))
        return [(render.component(c, size), f"u{i + 1} (σ={v:.3g})") for i, (c, v) in enumerate(zip(comps, sigma))]

    @guarded
    def generate(prompt, seed, layers, lo, hi, head, self_layer, self_lo, self_hi, self_head, k,
                 progress=gr.Progress()):  # noqa: B008 - how Gradio injects its progress bar
        t0 = started()
        rec = backend.record(prompt, seed, self_layer, (self_lo, self_hi), self_head, progress)
        words = word_gallery(rec, layers, lo, hi, head)
        status = timed(f"**{rec.prompt}**, seed {rec.seed}: {len(rec.words)} words × {len(rec.cross)} cross "
                       f"layers × {backend.num_steps} steps recorded, self layer {rec.self_layer}", t0)
        return rec, render.upscale(rec.image, size), words, self_gallery(rec, k), None, status

    @guarded
    def cross_maps(rec, layers, lo, hi, head):
        if rec is None:
            raise UserError("generate an image first (prompt, seed, Generate)")
        t0 = started()
        return word_gallery(rec, layers, lo, hi, head), timed("cross maps", t0)

    @guarded
    def self_maps(rec, self_layer, self_lo, self_hi, self_head, k, progress=gr.Progress()):  # noqa: B008 - how Gradio injects its progress bar
        if rec is None:
            raise UserError("generate an image first (prompt, seed, Generate)")
        t0 = started()
        rec = backend.record(rec.prompt, rec.seed, self_layer, (self_lo, self_hi), self_head, progress, cross_from=rec)
        return rec, self_gallery(rec, k), None, timed(f"self layer {rec.self_layer} recorded", t0)

    @guarded
    def components(rec, k):
        if rec is None:
            raise UserError("generate an image first (prompt, seed, Generate)")
        t0 = started()
        return self_gallery(rec, k), timed(f"top {int(k)} components", t0)

    @guarded
    def pixel(rec, x, y):
        if rec is None:
            raise UserError("generate an image first, then click a pixel of it")
        t0 = started()
        m = backend.pixel_map(rec, x, y)
        shown = render.mark(render.overlay(render.upscale(rec.image, size), m, alpha), float(x), float(y))
        return shown, timed(f"self-attention of the pixel at ({float(x):.2f}, {float(y):.2f})", t0)

    def clicked(rec, evt: gr.SelectData):
        if rec is None:
            return gr.skip(), gr.skip()
        x, y = evt.index  # pixel of the shown image: display_size high, the image's aspect
        h, w = rec.image.shape[:2]
        return x / round(size * w / h), y / size

    # ------------------------------------------------------------------ edit
    def settings_text(methods, fpe_layers, fpe_steps) -> str:
        chosen = {}
        for name in methods or []:
            settings = backend.method_settings(name)
            if name == "fpe":
                settings.update(layers=str(fpe_layers).strip() or settings["layers"],
                                self_replace_steps=float(fpe_steps))
            chosen[name] = settings
        return yaml.safe_dump(chosen, sort_keys=False, allow_unicode=True) if chosen else ""

    @guarded
    def show_settings(methods, fpe_layers, fpe_steps):
        return settings_text(methods, fpe_layers, fpe_steps)

    @guarded
    def edit(source, target, seed, upload, methods, settings, progress=gr.Progress()):  # noqa: B008 - how Gradio injects its progress bar
        t0 = started()
        try:
            given = yaml.safe_load(settings or "") or {}
        except yaml.YAMLError as e:
            raise UserError(f"the settings are not YAML: {first_line(e)}") from None
        if not isinstance(given, dict) or not all(isinstance(v, dict) or v is None for v in given.values()):
            raise UserError("the settings must map each method to its settings, e.g. fpe: {self_replace_steps: 0.6}")
        out = backend.edit(source, target, seed, {m: given.get(m) or {} for m in methods or []}, upload or None,
                           progress)
        plain = render.upscale(out.plain, size)
        gallery, table = [], []
        for row in out.rows:
            if row.get("edited") is not None:
                gallery += [(render.upscale(row["source"], size), f"{row['method']}: source"),
                            (render.upscale(row["edited"], size), f"{row['method']}: edited"),
                            (plain, f"plain target ({out.plain_note})")]
            notes = [row["error"] or out.clip_note]
            if row.get("shared_inversion_s"):
                notes.append(f"{row['shared_inversion_s']:.2f} s of it: an inversion shared with an earlier method")
            if row.get("same_source") is False:
                notes.append("its own source")
            table.append([row["method"], rounded(row.get("time_s"), 2), rounded(row.get("clip_score"), 2),
                          rounded(row.get("clip_directional"), 3), "; ".join(n for n in notes if n)])
        table.append(["plain target", None, rounded(out.plain_clip_score, 2), None, out.plain_note])
        done = sum(r.get("edited") is not None for r in out.rows)
        return gallery, table, timed(f"{done} of {len(out.rows)} methods edited", t0)

    # ------------------------------------------------------------------ probe results
    @guarded
    def probe(choice, folder):
        tables = read_probe_run(str(folder or "").strip() or choice or "", s["paper_dir"])
        panels, text = [], []
        for t in tables:
            panels.append((f"{t.stem} (ours)", t.ours))
            if t.paper is not None:
                panels.append((f"{t.stem} (paper)", t.paper))
            text += [f"**{t.caption}**", "", t.ours.to_markdown(floatfmt=".1f"), "", f"*{t.note}*", ""]
            if t.paper is not None:
                text += [t.paper.to_markdown(floatfmt=".1f"), ""]
        return render.table_heatmaps(panels), "\n".join(text)

    def refresh():
        return gr.Dropdown(choices=find_probe_runs(s["probe_root"]))

    # ------------------------------------------------------------------ layout
    cross_heads, self_heads = backend.head_count("cross"), backend.head_count("self")
    cross_choices = backend.layer_choices("cross")
    fpe = backend.method_settings("fpe")
    with gr.Blocks(title=TITLE, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## {TITLE}\n{backend.describe()}")
        status = gr.Markdown("", elem_id="status")
        rec = gr.State(None, time_to_live=3600)
        with gr.Tab("Maps", id="maps"):
            with gr.Row():
                prompt = gr.Textbox(s["prompt"], label="prompt", scale=4, elem_id="maps-prompt")
                seed = gr.Number(int(backend.cfg.seed), label="seed", precision=0, minimum=0, scale=1)
                generate_btn = gr.Button("Generate", variant="primary", scale=1, elem_id="maps-generate")
            with gr.Row():
                image = gr.Image(label="image — click a pixel to see what it attends to", interactive=False,
                                 elem_id="maps-image", format="png", height=420, scale=2)
                words = gr.Gallery(label="cross-attention per word", columns=4, height=420, format="png",
                                   elem_id="maps-words", scale=3)
            with gr.Row():
                layers = gr.Dropdown(cross_choices, value=[v for _, v in cross_choices], multiselect=True, scale=3,
                                     label="cross layers (averaged; the model's numbering: index · block · grid)")
                lo = gr.Slider(0, last, 0, step=1, label="from step")
                hi = gr.Slider(0, last, last, step=1, label="to step (averaged)")
                head = gr.Dropdown(heads_choices(cross_heads), value="mean", label="head")
            with gr.Accordion("self-attention: top SVD components (Fig. 3) and the map of a clicked pixel", open=True):
                with gr.Row():
                    self_layer = gr.Dropdown(backend.layer_choices("self"), value=int(s["self_layer"]),
                                             label="self layer")
                    self_lo = gr.Slider(0, last, 0, step=1, label="from step")
                    self_hi = gr.Slider(0, last, last, step=1, label="to step (averaged)")
                    self_head = gr.Dropdown(heads_choices(self_heads), value="mean", label="head")
                    k = gr.Slider(1, 16, int(s["components"]), step=1, label="components")
                with gr.Row():
                    comps = gr.Gallery(label="top left singular vectors of the self map", columns=6, height=300,
                                       format="png", elem_id="maps-components", scale=3)
                    with gr.Column(scale=1):
                        pixel_map = gr.Image(label="what the clicked pixel attends to", interactive=False,
                                             format="png", elem_id="maps-pixel", height=220)
                        with gr.Row():
                            px = gr.Number(0.5, label="pixel x (0–1)", minimum=0, maximum=1)
                            py = gr.Number(0.5, label="pixel y (0–1)", minimum=0, maximum=1)
            with gr.Accordion("layer table (this model's numbering)", open=False):
                gr.Dataframe(backend.layer_table(), headers=["kind", "index", "block", "query grid", "heads",
                                                             "diffusers processor"], interactive=False)
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                source = gr.Textbox(s["source_prompt"], label="source prompt (optional with an uploaded image)",
                                    elem_id="edit-source")
                target = gr.Textbox(s["target_prompt"], label="target prompt", elem_id="edit-target")
                edit_seed = gr.Number(int(backend.cfg.seed), label="seed", precision=0, minimum=0)
                upload = gr.File(label="or an image to edit", file_types=["image"], type="filepath", height=120)
            methods = gr.CheckboxGroup(backend.methods(), value=list(s["methods"]), label="methods (configs/method/)")
            with gr.Row():
                fpe_layers = gr.Textbox(str(fpe["layers"]), label="FPE self layers ('all', '2-5', '3,6', 'official')")
                fpe_steps = gr.Slider(0, 1, float(fpe["self_replace_steps"]), step=0.05,
                                      label="FPE step fraction (first part of the steps replaced)")
            settings = gr.Code(settings_text(s["methods"], fpe["layers"], fpe["self_replace_steps"]),
                               language="yaml", label="settings of the ticked methods (edit any)")
            edit_btn = gr.Button("Run edit", variant="primary", elem_id="edit-run")
            grid = gr.Gallery(label="source | edited | plain target, one row per method", columns=3, height="auto",
                              format="png", elem_id="edit-grid")
            scores = gr.Dataframe(headers=["method", "time (s)", "CLIP score", "CLIP directional", "note"],
                                  interactive=False, elem_id="edit-scores")
        with gr.Tab("Probe results", id="probe"):
            with gr.Row():
                runs = gr.Dropdown(find_probe_runs(s["probe_root"]), label="finished probe runs (outputs/)",
                                   scale=4)
                refresh_btn = gr.Button("Refresh", scale=1)
            folder = gr.Textbox("", label="or a probe run folder")
            open_btn = gr.Button("Open", variant="primary")
            heat = gr.Image(label="class × layer test accuracy (%)", interactive=False, format="png")
            probe_text = gr.Markdown()

        self_inputs = [self_layer, self_lo, self_hi, self_head, k]
        cross_inputs = [layers, lo, hi, head]
        gr.on([generate_btn.click, prompt.submit], generate, [prompt, seed, *cross_inputs, *self_inputs],
              [rec, image, words, comps, pixel_map, status], api_name="generate")
        gr.on([layers.change, lo.release, hi.release, head.change], cross_maps, [rec, *cross_inputs],
              [words, status], api_name="cross_maps")
        gr.on([self_layer.change, self_lo.release, self_hi.release, self_head.change], self_maps,
              [rec, *self_inputs], [rec, comps, pixel_map, status], api_name="self_maps")
        k.release(components, [rec, k], [comps, status], api_name="components")
        image.select(clicked, rec, [px, py], api_name=False).then(pixel, [rec, px, py], [pixel_map, status],
                                                                   api_name=False)
        gr.on([px.submit, py.submit], pixel, [rec, px, py], [pixel_map, status], api_name="pixel")
        gr.on([methods.change, fpe_layers.change, fpe_steps.release], show_settings, [methods, fpe_layers, fpe_steps],
              settings, api_name=False)
        edit_btn.click(edit, [source, target, edit_seed, upload, methods, settings], [grid, scores, status],
                       api_name="edit")
        refresh_btn.click(refresh, None, runs, api_name=False)
        open_btn.click(probe, [runs, folder], [heat, probe_text], api_name="probe")
    return page
