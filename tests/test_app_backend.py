"""The attention explorer's adapter (experiments.app.backend) and probe-results reader, without Gradio:
the recorded maps equal Figure 3's capture, the editors get the page's settings, bad input is one line."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from experiments.app.backend import Backend, compose_run
from experiments.app.probe_results import find_probe_runs, paper_table, read_probe_run
from sdattn.errors import UserError
from sdattn.tables import write_table

from .conftest import ROOT

PROMPT = "a white car in the park"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    if not (ROOT / "models" / "toy" / "model_index.json").exists():
        pytest.skip("the toy-world model is not in models/toy")
    out = tmp_path_factory.mktemp("app")
    cfg = compose_run(["task=app", f"paths.output_dir={out}", "logger=none", "app.warmup=false"])
    return Backend(cfg)


@pytest.fixture(scope="module")
def recording(backend):
    return backend.record(PROMPT, 3, 6)


def test_maps_equal_figure3_capture(backend, recording):
    """All layers, all steps, mean over heads == probing.attention_maps (the Figure 3 task's capture)."""
    from probing.attention_maps import capture_attention_maps

    cross = [x for x in backend.layers if x.kind == "cross"]
    ref = capture_attention_maps(backend.pipe, PROMPT, 3, cross, backend.layer("self", 6),
                                 num_inference_steps=backend.num_steps, guidance_scale=backend.guidance)
    ours = backend.cross_maps(recording, [x.index for x in cross], (0, backend.num_steps - 1))
    assert recording.words == ref.words == PROMPT.split()
    assert ours.shape == tuple(ref.cross.shape)
    np.testing.assert_allclose(ours, ref.cross.numpy(), atol=2e-3)  # the per-step maps are kept in float16
    torch.testing.assert_close(recording.self_map, ref.self_map)
    np.testing.assert_allclose(recording.image, ref.image.permute(1, 2, 0).numpy(), atol=1e-6)


def test_heads_steps_layers_select(backend, recording):
    heads = backend.head_count("cross", [6])
    mean = backend.cross_maps(recording, [6], (0, 24))
    per_head = np.stack([backend.cross_maps(recording, [6], (0, 24), str(h)) for h in range(heads)])
    np.testing.assert_allclose(per_head.mean(0), mean, atol=1e-5)
    assert np.abs(per_head[0] - mean).max() > 1e-3  # one head is not the mean
    early, late = backend.cross_maps(recording, [6], (0, 0)), backend.cross_maps(recording, [6], (24, 24))
    assert np.abs(early - late).max() > 1e-3
    small = backend.cross_maps(recording, [3], (0, 24))  # the 4² mid layer alone
    assert small.shape[-2:] == (4, 4) and mean.shape[-2:] == (16, 16)
    np.testing.assert_allclose(small.sum(0) <= 1 + 1e-3, True)  # shares of one softmax over the tokens


def test_self_map_pixel_and_components(backend, recording):
    h, w = recording.self_grid
    m = backend.pixel_map(recording, 0.0, 1.0)  # bottom-left query
    np.testing.assert_allclose(m, recording.self_map[(h - 1) * w].reshape(h, w).numpy())
    assert m.sum() == pytest.approx(1.0, abs=1e-4)
    comps, sigma = backend.self_components(recording, 4)
    assert comps.shape == (4, h, w) and np.all(np.diff(sigma) <= 0)
    one_head = backend.record(PROMPT, 3, 6, (10, 12), "1")
    assert not torch.allclose(one_head.self_map, recording.self_map)
    again = backend.record(PROMPT, 3, 6, (10, 12), "1", cross_from=recording)  # the self map alone, re-recorded
    assert again.cross is recording.cross and again.image is recording.image
    torch.testing.assert_close(again.self_map, one_head.self_map)


@pytest.mark.parametrize("call, message", [
    (lambda b, r: b.record("a purple unicorn", 0, 6), "outside this model's vocabulary"),
    (lambda b, r: b.record("   ", 0, 6), "the prompt is empty"),
    (lambda b, r: b.record(PROMPT, -1, 6), "is not a seed"),
    (lambda b, r: b.record(PROMPT, 0, 99), "self layer 99"),
    (lambda b, r: b.cross_maps(r, [6], (0, 25)), "steps 0..25"),
    (lambda b, r: b.cross_maps(r, [6], (0, 24), "7"), "head '7'"),
    (lambda b, r: b.cross_maps(r, [], (0, 24)), "no cross layer"),
    (lambda b, r: b.pixel_map(r, 1.5, 0), "outside the image"),
])
def test_bad_input_is_one_line(backend, recording, call, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        call(backend, recording)
    assert "\n" not in str(e.value)


def test_edit_passes_the_page_settings_to_fpe(backend):
    from editing.fpe import fpe_generated

    out = backend.edit("a white car", "a red car", 42, {"fpe": {"layers": "2-5", "self_replace_steps": 0.5},
                                                        "shape_guided": {}})  # real images only: its own error
    row, refused = out.rows
    assert refused["method"] == "shape_guided" and refused["error"] and refused.get("edited") is None
    ref = fpe_generated(backend.pipe, "a white car", "a red car", 42, layers="2-5", self_replace_steps=0.5,
                        num_inference_steps=backend.num_steps, guidance_scale=backend.guidance, progress=False)
    np.testing.assert_allclose(row["edited"], ref.images["edited"][0].permute(1, 2, 0).numpy(), atol=1e-6)
    assert row["error"] == "" and row["time_s"] > 0 and 0 < row["clip_score"] <= 100
    assert -1 <= row["clip_directional"] <= 1 and out.plain_clip_score is not None
    assert out.plain.shape == row["edited"].shape


@pytest.mark.parametrize("methods, message", [
    ({"fpe": {"self_replace_step": 0.5}}, "'self_replace_step' is not a setting of method 'fpe'"),
    ({"fpe": {"self_replace_steps": 1.5}}, "self_replace_steps"),
    ({"nope": {}}, "method 'nope' is not one of"),
    ({}, "no method chosen"),
])
def test_bad_edit_settings_refused_before_running(backend, methods, message):
    with pytest.raises(UserError, match=message):
        backend.edit("a white car", "a red car", 0, methods)


def test_unreadable_upload_names_the_file(backend, tmp_path):
    junk = tmp_path / "holiday.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(UserError, match="'holiday.png' cannot be read as an image") as e:
        backend.edit("", "a red car", 0, {"fpe": {}}, str(junk))
    assert str(tmp_path) not in str(e.value)


def test_method_settings_follow_the_model(backend):
    fpe = backend.method_settings("fpe")
    assert fpe["layers"] == "all" and fpe["num_inference_steps"] == 25 and fpe["guidance_scale"] == 2.0
    assert "name" not in fpe and not any(k.startswith("_") for k in fpe)
    assert set(backend.methods()) >= {"fpe", "p2p", "masactrl", "pnp"}
    assert [row[:5] for row in backend.layer_table() if row[0] == "cross"][2] == ["cross", 3, "mid", "4×4", 4]
    assert "model toy (models/toy;" in backend.describe() and str(ROOT) not in backend.describe()


@pytest.mark.slow
def test_float16_toy(tmp_path):
    """dtype=float16 on the toy model (CPU, slowly): recorded and shown maps stay float32 and finite."""
    b = Backend(compose_run(["task=app", f"paths.output_dir={tmp_path}", "logger=none", "dtype=float16"]))
    rec = b.record(PROMPT, 0, 6)
    maps = b.cross_maps(rec, [1, 6], (0, 24), "0")
    assert maps.dtype == np.float32 and np.isfinite(maps).all() and rec.self_map.dtype == torch.float32


# ------------------------------------------------------------------------------------ probe results

def probe_run(root, model: str, columns: list[str], probe: str = "cross_attn") -> str:
    """A finished probe run folder as the probe task leaves it: .hydra/config.yaml and <probe>.csv/.md."""
    cfg = compose_run([f"probe={probe}", f"model={model}", "logger=none"])
    folder = root / "runs" / f"2026-01-01_00-00-00_probe-{probe}-{model}"
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    table = pd.DataFrame({c: ["81.2 ± 3.4", "40.0 ± 0.0", "10.0 ± 0.0"] for c in columns},
                         index=["red", "white", "chance"])
    write_table(table, folder, probe, f"{probe} on {model}")
    return str(folder)


def test_probe_run_beside_the_paper(tmp_path):
    folder = probe_run(tmp_path, "tiny", ["L3", "L6", "Avg"])
    paper = tmp_path / "paper"
    paper.mkdir()  # datasets/paper's layout: the probes a table belongs to, class → layer → fraction
    (paper / "table1.yaml").write_text(yaml.safe_dump(
        {"table": 1, "model": "SD 1.5", "probes": ["cross_attn"], "layers": [3, 6, 9],
         "classes": {"red": {3: 0.97, 6: 0.97, 9: 0.93, "Avg": 0.96}, "green": {3: 0.93, 6: 0.91, 9: 0.91}}}))
    (Path(folder) / "cross_attn_vs_paper.csv").write_text("class,L3\nred,81.2 (97)\n")  # a copy beside a reference
    assert find_probe_runs(tmp_path) == [folder]
    t, = read_probe_run(folder, paper)
    assert t.stem == "cross_attn" and t.caption == "cross_attn on tiny"
    assert t.ours.loc["red", "L3"] == 81.2 and t.ours.loc["chance", "Avg"] == 10.0
    assert t.paper is not None and list(t.paper.index) == ["red"] and list(t.paper.columns) == ["L3", "L6"]  # no Avg:
    # the paper's is over layers 3, 6, 9
    assert t.paper.loc["red", "L6"] == pytest.approx(97.0)
    assert "Table 1 (SD 1.5)" in t.note


def test_probe_run_without_sd_layout_or_paper(tmp_path):
    toy = probe_run(tmp_path, "toy", ["L1", "L7", "Avg"], "self_attn")
    t, = read_probe_run(toy, tmp_path / "no-paper")
    assert t.paper is None and "own layer layout" in t.note
    tiny = probe_run(tmp_path / "b", "tiny", ["L3", "Avg"])
    t, = read_probe_run(tiny, tmp_path / "no-paper")
    assert t.paper is None and "no table of the paper in no-paper/ lists probe 'cross_attn'" in t.note
    with pytest.raises(UserError, match="is not a finished probe run"):
        read_probe_run(tmp_path, tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_probe_run(tmp_path / "missing", tmp_path)


def test_the_papers_tables_1_to_3():
    """The shipped datasets/paper tables, by our probe (and token) as the probe task finds them."""
    paper = ROOT / "datasets" / "paper"
    t1, note = paper_table(paper, "cross_attn")
    assert t1.loc["sheep", "L3"] == pytest.approx(97.0) and t1.loc["red", "Avg"] == pytest.approx(76.0)
    assert "Table 1" in note
    assert paper_table(paper, "self_attn")[0].loc["dog", "L9"] == pytest.approx(78.0)
    car, note = paper_table(paper, "cross_attn_tokens", "car")
    assert car.loc["orange", "Avg"] == pytest.approx(80.0) and "'car'" in note
    assert paper_table(paper, "nope")[0] is None


def test_task_app_without_the_extra_is_one_line(compose_cfg, monkeypatch):
    import sys

    from experiments.run import dispatch

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio → ImportError
    with pytest.raises(UserError, match=r"pip install '\.\[app\]'"):
        dispatch(compose_cfg("task=app", "logger=none"))


def test_a_busy_or_bad_port_is_one_line_before_loading():
    import socket

    from experiments.app.server import check_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(UserError, match=rf"app.port={s.getsockname()[1]} cannot be served on 127.0.0.1: "):
            check_port("127.0.0.1", s.getsockname()[1])
    with pytest.raises(UserError, match="is not a port"):
        check_port("127.0.0.1", 70000)


def test_sdattn_app_is_task_app():
    from experiments.console import shorthand

    assert shorthand(["app", "--share", "model=tiny"]) == ["task=app", "app.share=true", "model=tiny"]
    assert shorthand(["probe=cross_attn", "--share"]) == ["probe=cross_attn", "--share"]  # only after app
