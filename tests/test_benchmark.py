"""Benchmark harness (Tables 4–5): every method end to end on the tiny model, resume, tables, skips."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import editing.fpe
from editing.baselines.masactrl import MutualSelfAttention, masactrl_layers
from editing.baselines.p2p import p2p_hooks
from editing.img2img import sdedit_start
from editing.seq_aligner import refinement_mapper
from evaluation import runner as R
from evaluation.datasets import EditExample
from evaluation.records import read_pairs
from evaluation.tables import REL_FPE, TABLE5_ROWS
from experiments.run import dispatch
from sdattn.errors import UserError

ALL = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "method").glob("*.yaml"))
FAST = {"instructpix2pix": ["method.model=tiny"], "diffedit": ["method.num_maps_per_mask=2"],
        "pix2pix_zero": ["method.noise_regularization.num_reg_steps=0"]}
REAL_ONLY = {"shape_guided": "shape_guided runs on real images only (as in the paper)"}
PAIRS = [{"soure_prompt": "a red car", "edit_prompt": "a blue car"},
         {"soure_prompt": "a photo of a dog", "edit_prompt": "a photo of a cat in the park"}]


@pytest.fixture
def bench(tmp_path, compose_cfg, tiny_pipe, monkeypatch):
    """bench(*overrides) → the benchmark task's result on the tiny model (shared, not reloaded)."""
    import experiments.tasks.benchmark as task

    monkeypatch.setattr(task, "load_model", lambda cfg: tiny_pipe)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(PAIRS))

    def _run(*overrides):
        cfg = compose_cfg("experiment=table4", "data=car_fake_edit", f"data.path={data}", "model.steps=2",
                          "metrics.clip=tiny-random", "logger=none", f"paths.log_dir={tmp_path / 'logs'}", *overrides)
        return dispatch(cfg)

    return _run


def test_every_method_end_to_end_and_table_columns(bench, tmp_path, capsys):
    for m in ALL:
        res = bench(f"method={m}", "data.limit=2", *FAST.get(m, []))
        rows = read_pairs(f"{res['out_dir']}/pairs.jsonl")
        if m in REAL_ONLY:  # refused on generated pairs, one line each, recorded as skipped
            assert [(r["status"], r["error"]) for r in rows] == [("error", REAL_ONLY[m])] * 2, rows
            continue
        assert [r["status"] for r in rows] == ["ok", "ok"], rows  # pair 2: p2p refine (token counts differ)
        for r in rows:
            assert 0 <= r["clip_score"] <= 100 and -1 <= r["clip_directional"] <= 1 and r["time_s"] > 0
            assert (tmp_path / "logs/benchmark/tiny/car_fake_edit" / m / "images" / f"{r['id']}.png").is_file()
    table, files, cap = res["tables"]["table4"]["car_fake_edit"]
    assert sorted(table.index) == sorted(set(ALL) - set(REAL_ONLY)) and table.index[0] == "fpe"
    assert list(table.columns) == ["CLIP score ↑", "CLIP dir. sim. ↑", "Time (s) ↓", "PSNR ↑", "SSIM ↑",
                                   REL_FPE, "Pairs"]
    assert table.loc["fpe", REL_FPE] == "1.00×"
    assert "tiny-random" in cap and "meaningless" in cap
    md = files["md"].read_text()
    assert "CLIP: tiny-random" in md and files["tex"].is_file() and files["csv"].is_file()
    tex = files["tex"].read_text()
    assert r"sdedit\_0.5 &" in tex and r"pix2pix\_zero &" in tex  # names with "_" compile in LaTeX
    assert r"\caption{Table 4 — car\_fake\_edit, model tiny" in tex
    assert res["tables"]["table5"] is None and not (tmp_path / "logs/benchmark/tiny/table5.md").exists()
    res = bench("method=fpe", "data.limit=2", "benchmark.table=table5")  # table5.* only from the Table 5 experiment
    t5 = res["tables"]["table5"][0]
    # the paper's rows in its order (SDEdit … FPE), then the others by name
    assert list(t5.index) == ([TABLE5_ROWS[m] for m in TABLE5_ROWS if m in table.index]
                              + sorted(m for m in table.index if m not in TABLE5_ROWS))
    assert (tmp_path / "logs/benchmark/tiny/table5.md").is_file()
    # no benchmark.table5 layout here: one group per dataset, its kind read from the records
    assert list(t5.columns) == ["car_fake_edit fake CS", "car_fake_edit fake CDS", "Editing time (s) fake",
                                "Editing time (s) real"]
    print("\n" + table.to_markdown())  # per-image times on the tiny model (pytest -s)


def test_resume_after_interruption_gives_the_same_table(bench, monkeypatch):
    counter = itertools.count()
    monkeypatch.setattr(R, "clock", lambda: float(next(counter)))  # every edit takes "1 s"
    calls = []
    real = editing.fpe.edit_fpe
    monkeypatch.setattr(editing.fpe, "edit_fpe",
                        lambda pipe, ex, *a, **kw: (calls.append(ex.id), real(pipe, ex, *a, **kw))[1])
    res = bench("method=fpe", "data.limit=2")
    assert calls == ["car_fake_edit/00000"] * 2 + ["car_fake_edit/00001"]  # warm-up + 2 pairs
    table, files, _ = res["tables"]["table4"]["car_fake_edit"]
    before = {k: p.read_text() for k, p in files.items()}
    pairs = f"{res['out_dir']}/pairs.jsonl"
    lines = open(pairs).read().splitlines()
    open(pairs, "w").write(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing pair 2
    for p in files.values():
        p.unlink()
    calls.clear()
    res = bench("method=fpe", "data.limit=2")
    assert calls == ["car_fake_edit/00001"] * 2  # warm-up + the missing pair only
    assert res["summary"].resumed == 1 and res["summary"].edited == ["car_fake_edit/00001"]
    assert {k: p.read_text() for k, p in res["tables"]["table4"]["car_fake_edit"][1].items()} == before
    assert len(read_pairs(pairs)) == 2
    calls.clear()
    bench("method=fpe", "data.limit=2")  # nothing left: no edit, not even a warm-up
    assert calls == []


def test_unknown_method_is_a_one_line_error(bench):
    with pytest.raises(UserError) as e:
        bench("method=fpe", "method.name=nope", "method._target_=editing.nope.edit_nope")
    msg = str(e.value)
    assert "\n" not in msg and "'nope'" in msg and "editing.nope.edit_nope" in msg
    with pytest.raises(UserError, match="method.bogus is not a setting of method 'fpe'"):
        bench("method=fpe", "+method.bogus=1")


def test_missing_image_is_skipped_and_reported(bench, tmp_path, capsys):
    Image.new("RGB", (40, 36), (200, 30, 30)).save(tmp_path / "car.png")
    data = tmp_path / "real.json"
    data.write_text(json.dumps([{"image_name": "car.png", "soure_prompt": "a red car", "edit_prompt": "a blue car"},
                                {"image_name": "gone.png", "soure_prompt": "a red car", "edit_prompt": "a cat"}]))
    res = bench("method=sdedit_0.5", "data=car_real_edit", f"data.path={data}", f"data.root={tmp_path}")
    rows = read_pairs(f"{res['out_dir']}/pairs.jsonl")
    assert [r["id"] for r in rows] == ["car_real_edit/00000"]
    assert res["summary"].missing == 1
    out = capsys.readouterr().out
    assert "1 skipped: 1 missing images" in out and "gone.png" in out
    assert res["summary"].resized == 1 and "1 images resized to the model's size (0 upsampled)" in out


def test_rows_say_where_and_when_they_were_timed(bench):
    res = bench("method=fpe", "data.limit=1")
    (row,) = read_pairs(f"{res['out_dir']}/pairs.jsonl")
    assert row["run_id"] and row["timed_at"] and "CPU" in row["device"]
    assert row["torch"] == torch.__version__ and row["diffusers"] and row["transformers"]


def test_a_folder_is_written_by_one_run_at_a_time(bench, tmp_path):
    from evaluation.records import RecordStore

    with RecordStore(tmp_path / "logs/benchmark/tiny/car_fake_edit/fpe").lock():
        with pytest.raises(UserError, match="is being written by another run"):
            bench("method=fpe", "data.limit=1")
    assert bench("method=fpe", "data.limit=1")["summary"].edited == ["car_fake_edit/00000"]  # free again


def test_a_pair_is_never_kept_twice(tmp_path):
    rows = [{"id": "a", "status": "ok", "clip_score": 1.0}, {"id": "b", "status": "ok", "clip_score": 2.0},
            {"id": "a", "status": "ok", "clip_score": 3.0}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["clip_score"] for r in read_pairs(path)] == [1.0, 2.0]
    read_pairs(path, repair=True)
    assert len(path.read_text().splitlines()) == 2


def test_time_ratios_only_between_rows_timed_together():
    from evaluation.tables import table4

    def rows(run, t):
        return [{"id": str(i), "clip_score": 50.0, "clip_directional": 0.5, "time_s": t, "psnr": 20.0, "ssim": 0.5,
                 "run_id": run} for i in range(2)]

    together = table4({"fpe": rows("r1", 2.0), "p2p": rows("r1", 1.0)})
    assert together.loc["p2p", REL_FPE] == "0.50×"
    apart = table4({"fpe": rows("r1", 2.0), "p2p": rows("r2", 1.0)})  # e.g. a resumed run, another load
    assert apart.loc["p2p", REL_FPE] == "–" and apart.loc["fpe", REL_FPE] == "1.00×"


def test_unreadable_image_is_skipped_and_reported(bench, tmp_path, capsys):
    Image.new("RGB", (40, 36), (200, 30, 30)).save(tmp_path / "car.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    data = tmp_path / "real.json"
    data.write_text(json.dumps([{"image_name": "broken.png", "soure_prompt": "a red car", "edit_prompt": "a blue car"},
                                {"image_name": "car.png", "soure_prompt": "a red car", "edit_prompt": "a blue car"}]))
    res = bench("method=sdedit_0.5", "data=car_real_edit", f"data.path={data}", f"data.root={tmp_path}")
    rows = read_pairs(f"{res['out_dir']}/pairs.jsonl")
    assert [r["status"] for r in rows] == ["error", "ok"] and "cannot be read" in rows[0]["error"]
    assert "1 errors (first: car_real_edit/00000: image" in capsys.readouterr().out


def test_method_error_is_skipped_and_reported(bench, capsys):
    res = bench("method=p2p", "method.refine=false", "data.limit=2")
    rows = read_pairs(f"{res['out_dir']}/pairs.jsonl")
    assert [r["status"] for r in rows] == ["ok", "error"] and "p2p refine" in rows[1]["error"]
    assert "1 skipped: 1 errors" in capsys.readouterr().out


def test_clip_load_failure_is_one_line(bench, tmp_path):
    with pytest.raises(UserError, match="not available") as e:
        bench("method=fpe", f"metrics.clip={tmp_path / 'no-clip'}")
    assert "\n" not in str(e.value)


def test_other_settings_in_same_out_dir_are_refused(bench):
    bench("method=sdedit_0.5", "data.limit=1")
    with pytest.raises(UserError, match="other settings"):
        bench("method=sdedit_0.5", "data.limit=1", "method.strength=0.9")


# ------------------------------------------------------------------------------- method internals

def test_masactrl_inactive_equals_plain_pair_sampling(tiny_pipe):
    from editing.two_branch import replacement_edit
    from sdattn.sampling import initial_latents

    z = initial_latents(tiny_pipe, [3])
    plain = replacement_edit(tiny_pipe, "a red car", "a blue car", z, {}, 2, 7.5, progress=False)
    hooks = {x: (lambda lay, st: MutualSelfAttention(lay, st, 99)) for x in masactrl_layers(tiny_pipe, 10)}
    assert [x.index for x in hooks] == [11, 12, 13, 14, 15, 16]
    same = replacement_edit(tiny_pipe, "a red car", "a blue car", z, hooks, 2, 7.5, progress=False)
    torch.testing.assert_close(same, plain)
    hooks = {x: (lambda lay, st: MutualSelfAttention(lay, st, 0)) for x in masactrl_layers(tiny_pipe, 10)}
    edited = replacement_edit(tiny_pipe, "a red car", "a blue car", z, hooks, 2, 7.5, progress=False)
    torch.testing.assert_close(edited[0], plain[0])  # the source branch is untouched
    assert not torch.allclose(edited[1], plain[1])


def test_p2p_modes_and_refinement_mapping(tiny_pipe):
    tok = tiny_pipe.tokenizer
    mapper, alphas = refinement_mapper("a red car", "a photo of a red car", tok, tok.model_max_length)
    assert mapper[:8].tolist() == [0, 1, -1, -1, -1, 2, 3, 4]  # start, a (the first: NW's tie order), red, car, end
    assert alphas[:8].tolist() == [1, 1, 0, 0, 0, 1, 1, 1]
    cfg = dict(cross_replace_steps=0.8, self_replace_steps=0.4, cross_layers="all", self_layers="official", refine=True)
    assert p2p_hooks(tiny_pipe, "a red car", "a blue car", 2, **cfg)[1] == "replace"
    assert p2p_hooks(tiny_pipe, "a red car", "a photo of a red car", 2, **cfg)[1] == "refine"


def test_sdedit_start():
    assert sdedit_start(50, 0.5) == 25 and sdedit_start(50, 0.75) == 13 and sdedit_start(2, 1.0) == 0
    with pytest.raises(UserError):
        sdedit_start(50, 0.0)


def test_generated_pair_source_matches_plain_sampling(tiny_pipe, make_method):
    from sdattn.sampling import sample

    ex = EditExample("x", "a red car", "a blue car")
    ref = sample(tiny_pipe, ["a red car"], seeds=[5], num_inference_steps=2, progress=False).images
    for name in ("fpe", "masactrl", "sdedit_0.5"):
        src, _ = make_method(name, num_inference_steps=2)(tiny_pipe, ex, 5)
        torch.testing.assert_close(src, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # 2 min on 2 cores; every method on a real pair also runs in test_half_precision.py
def test_real_image_pairs_every_method(bench, tmp_path):
    Image.new("RGB", (36, 32), (200, 30, 30)).save(tmp_path / "car.png")
    data = tmp_path / "real.json"
    data.write_text(json.dumps([{"image_name": "car.png", "soure_prompt": "a red car", "edit_prompt": "a blue car"}]))
    for m in ALL:
        extra = ["method.null_text.inner_steps=2"] if m == "p2p" else FAST.get(m, [])
        res = bench(f"method={m}", "data=car_real_edit", f"data.path={data}", f"data.root={tmp_path}", *extra)
        rows = read_pairs(f"{res['out_dir']}/pairs.jsonl")
        assert [r["status"] for r in rows] == ["ok"] and rows[0]["image_path"].endswith("car.png")
    src = Image.open(f"{res['out_dir']}/images/car_real_edit/00000_source.png")
    assert src.size == (32, 32)  # the input image (cropped to the model size) is the source


def test_every_method_config_builds_its_editor(compose_cfg):
    from editing.methods import build_method

    assert len(ALL) >= 9
    for name in ALL:
        label, edit = build_method(compose_cfg(f"method={name}").method)
        assert label == name and callable(edit)


def test_a_new_method_is_one_module_and_one_config(bench, plugin):
    """A dummy editor (a module on the path + configs/method/dummy.yaml in another config dir) runs
    through the benchmark task with no registry edit."""
    searchpath = plugin(
        "dummy_editor",
        "import torch\n\n"
        "def edit_dummy(pipe, example, seed, image=None, *, gain: float, num_inference_steps: int,\n"
        "               guidance_scale: float):\n"
        "    source = torch.full((1, 3, 32, 32), 0.5) if image is None else image\n"
        "    return source, (source * gain).clamp(0, 1)\n",
        "method", "dummy",
        "name: dummy\n_target_: dummy_editor.edit_dummy\n_partial_: true\ngain: 0.5\n"
        "num_inference_steps: ${model.steps}\nguidance_scale: ${model.guidance_scale}\n")
    res = bench("method=dummy", "data.limit=2", searchpath)
    rows = read_pairs(f"{res['out_dir']}/pairs.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok"] and res["out_dir"].endswith("/dummy")
    assert rows[0]["psnr"] == pytest.approx(10 * math.log10(1 / 0.25 ** 2), abs=1e-3)  # 0.5 → 0.25: the dummy edited
    assert "dummy" in res["tables"]["table4"]["car_fake_edit"][0].index


def test_a_new_metric_is_one_function_and_one_config(bench, plugin):
    """A dummy metric (a function on the path + configs/metric/dummy.yaml in another config dir) is scored,
    recorded and tabled with no edit of the runner, the task or the tables; a value it cannot give (None)
    is left out of its mean and counted."""
    searchpath = plugin(
        "dummy_metric",
        "def brightness(example, source, edited, *, scale: float):\n"
        "    return {'brightness': None if example.id.endswith('1') else scale * float(edited.mean())}\n",
        "metric", "dummy",
        "dummy:\n  _target_: dummy_metric.brightness\n  _partial_: true\n  scale: 100.0\n"
        "  columns:\n    brightness: {header: Brightness, digits: 1, missing: too dark}\n")
    res = bench("method=sdedit_0.5", "data.limit=2", "+metric=dummy", searchpath)
    rows = read_pairs(f"{res['out_dir']}/pairs.jsonl")
    assert 0 <= rows[0]["brightness"] <= 100 and rows[1]["brightness"] is None and "psnr" in rows[0]
    table, files, cap = res["tables"]["table4"]["car_fake_edit"]
    assert table.loc["sdedit_0.5", "Brightness"] == f"{rows[0]['brightness']:.1f} ± 0.0 (1/2)"
    assert "Brightness: sdedit_0.5 over 1 of 2 pairs; 1 too dark" in cap
    meta = json.loads((Path(res["out_dir"]) / "meta.json").read_text())
    assert meta["metrics"]["dummy"] == {"target": "dummy_metric.brightness", "scale": 100.0}
    # structure: off (no DINO model); toy_edit's columns are described, but no row here has them (not a toy pair)
    assert [c["key"] for c in meta["columns"]] == ["psnr", "ssim", "edit_ok", "mask_iou", "brightness"]
    assert "Mask IoU ↑" not in table.columns
