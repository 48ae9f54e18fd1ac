"""The paper's Tables 1–5 (datasets/paper/) against the paper's text, and shown beside ours: probe tables on an
SD-1.x-layout model, Table 4 and Table 5 with benchmark.compare_paper, the generated TI2I sets filling Table 5's
eight score columns."""

import json
import re

import pandas as pd
import pytest
import yaml

from evaluation.datasets import load_dataset
from experiments.run import dispatch
from probing.tables import beside_paper, paper_probe_table, sd1x_layout
from sdattn.layers import enumerate_layers
from sdattn.sampling import latent_size

from .conftest import ROOT, SHARED

PAPER = ROOT / "datasets" / "paper"
TITLE = "Towards Understanding Cross and Self-Attention in Stable Diffusion"
LAYERS = [3, 6, 9, 10, 12, 14, 16]
TEXT_NAMES = {"leopare": "leopard"}  # the text's one damaged row name (Table 2: "leopare\t1 0.47 …")


def paper(n: int) -> dict:
    return yaml.safe_load((PAPER / f"table{n}.yaml").read_text())


# --- the transcription against the paper's text ------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_lines() -> list[str]:
    found = [p for p in sorted((SHARED / "paper").glob("*.txt")) if TITLE in p.read_text(encoding="utf-8")] \
        if (SHARED / "paper").is_dir() else []
    if not found:
        pytest.skip("the paper's text (../shared/paper/) is not here")
    return found[0].read_text(encoding="utf-8").splitlines()


def class_rows(lines: list[str], start: int, count: int) -> list[tuple[str, list[float]]]:
    """(class, 8 numbers) of ``count`` rows after the header at ``start``: the name is the first word, the numbers
    every two-decimal number of the row (a stray digit of the text's layout is not one)."""
    rows = []
    for line in lines[start + 1:start + 1 + count]:
        name = re.match(r"\s*([a-z]+)", line).group(1)
        rows.append((TEXT_NAMES.get(name, name), [float(x) for x in re.findall(r"\b\d\.\d\d\b", line)]))
    return rows


def by_layer(values: dict) -> list[float]:
    return [values[n] for n in LAYERS] + [values["Avg"]]


def test_tables_1_to_3_are_the_papers(text_lines):
    headers = [i for i, line in enumerate(text_lines) if line.startswith("Class\tLayer 3")]
    assert len(headers) == 3  # Tables 1, 2, 3 in that order
    t1, t2, t3 = (class_rows(text_lines, i, 10) for i in headers)
    for rows, table in ((t1, paper(1)["classes"]), (t2, paper(2)["classes"])):
        assert [name for name, _ in rows] == list(table)
        for name, numbers in rows:
            assert numbers == by_layer(table[name]), name
    a, car = paper(3)["tokens"]["a"], paper(3)["tokens"]["car"]  # the upper part "a", the lower "car"
    assert [name for name, _ in t3] == list(a) + list(car)
    for (name, numbers), values in zip(t3, [*a.values(), *car.values()], strict=True):
        assert numbers == by_layer(values), name
    for n in (1, 2, 3):
        assert paper(n)["layers"] == LAYERS


def test_table_4_is_the_papers(text_lines):
    table = paper(4)["datasets"]
    rows = {}
    for line in text_lines:
        m = re.match(r"((?:Car|ImageNet)-(?:fake|real)-edit)\t(.*)", line)
        if m:
            rows[m.group(1)] = [float(x) for x in m.group(2).split("\t") if x.strip()]
    assert sorted(rows) == sorted(e["label"] for e in table.values())
    for entry in table.values():  # columns: CS P2P, CS Ours, CDS P2P, CDS Ours
        want = [entry["p2p"]["CS"], entry["fpe"]["CS"], entry["p2p"]["CDS"], entry["fpe"]["CDS"]]
        assert rows[entry["label"]] == want, entry["label"]


def test_table_5_is_the_papers(text_lines):
    t5 = paper(5)
    start = next(i for i, line in enumerate(text_lines) if line.startswith("Method\tImageNet-R-TI2I fake"))
    label_of = {v: k for k, v in t5["labels"].items()}
    seen = []
    for line in text_lines[start + 2:start + 11]:  # after the header and its CS/CDS line: 9 methods
        cells = [re.sub(r"</?u>", "", c).strip() for c in line.split("\t")]
        method = label_of[cells[0]]
        numbers = [None if c == "-" else float(c) for c in cells[1:] if c]
        assert len(numbers) == 10, line
        entry = t5["methods"][method]
        want = []
        for group in ("ImageNet-R-TI2I", "Wild-TI2I"):  # the text's column order
            for kind in ("fake", "real"):
                scores = entry["scores"][group][kind]
                want += [None, None] if scores is None else [scores["CS"], scores["CDS"]]
        want += [entry["time_s"]["fake"], entry["time_s"]["real"]]
        assert numbers == want, method
        seen.append(method)
    assert seen == list(t5["methods"]) == list(t5["labels"])


# --- probe tables: the paper's value in each shared cell ------------------------------------------------------
def test_only_an_sd1x_layout_gets_the_papers_layer_numbers(tiny_pipe, toy_pipe):
    assert sd1x_layout(enumerate_layers(tiny_pipe.unet, latent_size(tiny_pipe)))
    assert not sd1x_layout(enumerate_layers(toy_pipe.unet, latent_size(toy_pipe)))


def test_beside_paper_fills_the_shared_cells_only():
    t1 = paper_probe_table(PAPER, "cross_attn")
    assert t1["table"] == 1 and paper_probe_table(PAPER, "cross_attn_tokens", "car")["classes"]["red"][6] == 0.88
    assert paper_probe_table(PAPER, "self_attn")["table"] == 2 and paper_probe_table(PAPER, "nonsense") is None
    ours = pd.DataFrame({"L3": ["50.0", "60.0"], "L5": ["1.0", "2.0"], "Avg": ["9.0", "9.5"]}, index=["green", "blue"])
    shown = beside_paper(ours, t1)
    assert shown.loc["green", "L3"] == "50.0 (93)"  # Table 1, green, layer 3: 0.93
    assert shown.loc["green", "L5"] == "1.0" and shown.loc["blue", "L3"] == "60.0"  # no layer 5 / no blue there
    assert shown.loc["green", "Avg"] == "9.0"  # our Avg is over other layers than the paper's: not compared
    full = pd.DataFrame({f"L{n}": ["1.0"] for n in LAYERS} | {"Avg": ["2.0"]}, index=["red"])
    assert beside_paper(full, t1).loc["red", "Avg"] == "2.0 (76)"


def test_probe_run_on_the_tiny_model_writes_the_table_beside_the_paper(compose_cfg, tmp_path, capsys):
    cfg = compose_cfg("probe=cross_attn", "probe.n_per_class=2", "probe.num_inference_steps=2", "probe.batch_size=40",
                      "trainer.max_epochs=2", "probe.layers=[3,14]", "probe.classes=[green,blue]", "logger=none")
    result = dispatch(cfg)
    shown = pd.read_csv(tmp_path / "out" / "cross_attn_vs_paper.csv", index_col=0, dtype=str)
    assert shown.loc["green", "L3"].endswith(" (93)") and shown.loc["green", "L14"].endswith(" (38)")
    assert "(" not in shown.loc["blue", "L3"]  # blue is not in the paper's table
    assert pd.read_csv(result["files"]["cross_attn"]["csv"], index_col=0).loc["green", "L3"] >= 0  # ours: numbers
    out = capsys.readouterr().out
    assert "Liu et al. 2024 Table 1" in out and "a different model's reference, not a target for model tiny" in out


# --- benchmark tables ------------------------------------------------------------------------------------------
@pytest.fixture
def bench(tmp_path, compose_cfg, tiny_pipe, monkeypatch):
    import experiments.tasks.benchmark as task

    monkeypatch.setattr(task, "load_model", lambda cfg: tiny_pipe)

    def _run(*overrides):
        return dispatch(compose_cfg("model.steps=2", "metrics.clip=tiny-random", "logger=none",
                                    f"paths.log_dir={tmp_path / 'logs'}", *overrides))

    return _run


def test_table4_compare_paper_prints_both(bench, tmp_path, capsys):
    data = tmp_path / "Car_fake_edit.json"
    data.write_text(json.dumps([{"soure_prompt": "a red car", "edit_prompt": "a blue car"}]))
    for method in ("fpe", "p2p"):
        res = bench("experiment=table4", f"method={method}", "data=car_fake_edit", f"data.path={data}",
                    "benchmark.compare_paper=true")
    t, _, cap = res["tables"]["table4"]["car_fake_edit"]
    assert t.loc["p2p", "CLIP score ↑"].endswith(" (25.96)") and t.loc["fpe", "CLIP dir. sim. ↑"].endswith(" (0.2659)")
    assert re.fullmatch(r"-?\d\.\d{4} ± \d\.\d{4} \(0\.2451\)", t.loc["p2p", "CLIP dir. sim. ↑"])  # CDS: 4 digits
    assert "a different model's reference, not a target for model tiny" in cap
    pt, files, pcap = res["tables"]["paper"]
    assert list(pt.index) == ["Car-fake-edit", "Car-real-edit", "ImageNet-fake-edit", "ImageNet-real-edit"]
    assert pt.loc["ImageNet-real-edit", "CDS FPE"] == "0.2468" and files["md"].name == "table4_paper.md"
    assert "The paper's Table 4" in capsys.readouterr().out


def test_table5_on_the_toy_layout_prints_the_whole_paper_table_as_another_models_reference(bench, capsys):
    res = bench("experiment=table5", "method=fpe", "data=toy_fake_edit", "data.limit=1",
                "benchmark.compare_paper=true")
    t = res["tables"]["table5"][0]
    assert not any("(" in c for c in t.to_numpy().ravel())  # no paper group here: ours only
    pt, _, pcap = res["tables"]["paper"]
    assert list(pt.index) == ["SDEdit (0.5)", "SDEdit (0.75)", "Shape-Guided", "DiffEdit", "Pix2pixzero", "P2P",
                              "PnP", "MasaCtrl", "FPE"]
    assert pt.shape == (9, 10) and pt.loc["PnP", "Editing time (s) fake"] == "335.65"
    assert pt.loc["FPE", "Wild-TI2I fake CDS"] == "0.3116" and pt.loc["SDEdit (0.5)", "Wild-TI2I fake CS"] == "–"
    assert "a different model and data's reference, not a target for model tiny" in pcap
    assert "measured on the same hardware" in pcap and "The paper's Table 5" in capsys.readouterr().out


def write_ti2i_sets(folder, tiny_pipe) -> dict:
    """The four TI2I YAMLs in the released layout (real: init_img under data/; fake: prompts and seeds only)."""
    import numpy as np
    from PIL import Image

    (folder / "data").mkdir(parents=True)
    Image.fromarray(np.full((40, 30, 3), 120, dtype=np.uint8)).save(folder / "data" / "cat.png")
    real = [{"init_img": "data/wild-ti2i/data/cat.png", "source_prompt": "a photo of a cat",
             "target_prompts": ["a photo of a dog"]}]
    fake = [{"source_prompt": "a photo of a cat", "seed": 3, "scale": 10, "ddim_steps": 50,
             "target_prompts": ["a photo of a dog", "a photo of a red cat"]}]
    paths = {}
    for name, doc in (("real", real), ("fake", fake)):
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc))
    return paths


def test_ti2i_loaders_read_the_released_layout(tmp_path, tiny_pipe):
    paths = write_ti2i_sets(tmp_path, tiny_pipe)
    fake = load_dataset("wild_ti2i_fake", path=str(paths["fake"]))
    assert [(e.id, e.source_prompt, e.target_prompt, e.image_path, e.seed) for e in fake] == [
        ("wild_ti2i_fake/000", "a photo of a cat", "a photo of a dog", None, 3),
        ("wild_ti2i_fake/001", "a photo of a cat", "a photo of a red cat", None, 3)]
    assert fake.examples[0].extra["scale"] == 10
    real = load_dataset("imagenet_r_ti2i_real", path=str(paths["real"]), root=str(tmp_path))
    assert real.examples[0].image_path == str(tmp_path / "data" / "cat.png") and not real.missing_images


def test_table5_paper_fills_all_eight_score_columns(bench, tmp_path, tiny_pipe):
    paths = write_ti2i_sets(tmp_path / "ti2i", tiny_pipe)
    for group in ("imagenet_r_ti2i", "wild_ti2i"):
        for kind in ("fake", "real"):
            res = bench("experiment=table5_paper", "model=tiny", "method=fpe", f"data={group}_{kind}",
                        f"data.path={paths[kind]}", "data.limit=1")
    t, _, cap = res["tables"]["table5"]
    scores = [c for c in t.columns if c.endswith((" CS", " CDS"))]
    assert len(scores) == 8 and all(" ± " in t.loc["FPE", c] for c in scores)
    assert t.loc["FPE", "ImageNet-R-TI2I fake CDS"].endswith(" (0.3559)")
    assert t.loc["FPE", "Wild-TI2I real CS"].endswith(" (29.04)") and t.loc["FPE", "Editing time (s) real"].endswith(
        " (10.75)")
    assert "not a target for model tiny" in cap
