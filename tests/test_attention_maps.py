"""Figure 3 (attention maps) task, its capture against explicit attention probabilities, and the bench."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from experiments.run import dispatch
from probing.attention_maps import capture_attention_maps, top_components
from sdattn.errors import UserError
from sdattn.layers import enumerate_layers, select_layers
from sdattn.sampling import sample
from sdattn.text import word_token_positions

from .conftest import ROOT
from .test_capture import explicit_probs

FAST = ["experiment=attention_maps", "model=tiny", "attention_maps.num_inference_steps=3", "logger=none"]


def test_task_writes_figure(compose_cfg, tmp_path, tiny_pipe, monkeypatch):
    monkeypatch.setattr("experiments.tasks.attention_maps.load_model", lambda cfg: tiny_pipe)  # = model=tiny
    result = dispatch(compose_cfg(*FAST))
    png = tmp_path / "out" / "attention_maps.png"
    assert result["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["words"] == ["a", "white", "horse", "in", "the", "park"]
    assert result["cross_layers"] == ["cross-5", "cross-6", "cross-8", "cross-9", "cross-10"]  # 4×4 = 1/4 of 16
    assert result["self_layer"] == "self-11"
    assert result["shapes"] == {"image": (3, 32, 32), "cross": (6, 4, 4), "self_map": (64, 64),
                                "components": (6, 8, 8), "singular_values": (6,)}
    saved = np.load(result["npz"])
    assert saved["components"].shape == (6, 8, 8) and list(saved["words"]) == result["words"]


def test_experiment_config_selects_the_task(compose_cfg):
    cfg = compose_cfg("experiment=attention_maps", "prompt=a red car")
    assert (cfg.task, cfg.prompt, cfg.attention_maps.self_layer) == ("attention_maps", "a red car", 11)
    assert cfg.attention_maps.num_inference_steps == cfg.model.steps


def test_maps_equal_explicit_attention_probabilities(tiny_pipe):
    layers = enumerate_layers(tiny_pipe.unet)
    cross = select_layers(layers, "all", "cross", "1/4")
    (self_layer,) = select_layers(layers, 11, "self")
    prompt, words = "a zebra in the park", ["zebra", "park"]  # "zebra" is several tokens in the tiny vocabulary
    maps = capture_attention_maps(tiny_pipe, prompt, 3, cross, self_layer, words, cross_steps=[1, 2],
                                  self_steps=[0, 2], num_inference_steps=3, guidance_scale=7.5)
    store = explicit_probs(tiny_pipe, [*cross, self_layer], [prompt], [3], 3)  # {label: (steps, B, N, M)}
    plain = sample(tiny_pipe, [prompt], [3], num_inference_steps=3, progress=False).images[0]
    assert torch.allclose(maps.image, plain)  # recording leaves the layers' outputs alone
    for t, word in enumerate(words):
        pos = word_token_positions(tiny_pipe.tokenizer, prompt, word)
        expected = torch.stack([store[x.label][s, 0][:, pos].mean(-1) for x in cross for s in (1, 2)]).mean(0)
        assert torch.allclose(maps.cross[t], expected.reshape(4, 4), atol=1e-6), word
    assert len(word_token_positions(tiny_pipe.tokenizer, prompt, "zebra")) > 1
    expected_self = (store["self-11"][0, 0] + store["self-11"][2, 0]) / 2  # (64, 64)
    assert torch.allclose(maps.self_map, expected_self, atol=1e-6)
    assert torch.allclose(maps.self_map.sum(-1), torch.ones(64), atol=1e-5)


def test_svd_components_are_orthonormal_singular_vectors():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(64, 64, generator=g).softmax(-1)  # a row-stochastic "attention map" on an 8×8 grid
    comps, sigma = top_components(m, (8, 8), k=6)
    assert comps.shape == (6, 8, 8) and sigma.shape == (6,)
    u = comps.reshape(6, 64).double()  # (k, N)
    assert torch.allclose(u @ u.T, torch.eye(6, dtype=torch.float64), atol=1e-5)
    mmt = m.double() @ m.double().T
    assert torch.allclose(u @ mmt, (sigma.double() ** 2)[:, None] * u, atol=1e-5)  # M Mᵀ u = σ² u
    assert (sigma[:-1] >= sigma[1:]).all()
    with pytest.raises(UserError, match="does not match a 4x4 grid"):
        top_components(m, (4, 4))


def test_layer_choices(tiny_pipe):
    layers = enumerate_layers(tiny_pipe.unet)  # query grids 16, 8, 4 (mid 2)
    assert [x.index for x in select_layers(layers, "all", "cross", "1/4")] == [5, 6, 8, 9, 10]
    assert select_layers(layers, "all", "cross", 4) == select_layers(layers, "all", "cross", "1/4")
    assert select_layers(layers, "1-4", "cross", "all") == select_layers(layers, "1-4", "cross")
    with pytest.raises(UserError, match="resolution 'quarter' is not a grid side"):
        select_layers(layers, "all", "cross", "quarter")


def test_bad_words_and_layers_are_user_errors(compose_cfg, tiny_pipe, monkeypatch):
    monkeypatch.setattr("experiments.tasks.attention_maps.load_model", lambda cfg: tiny_pipe)  # = model=tiny
    with pytest.raises(UserError, match=r"word 'dog' is not in the prompt 'a white horse in the park'; words there"):
        dispatch(compose_cfg(*FAST, "attention_maps.words=[horse,dog]"))
    with pytest.raises(UserError, match="attention_maps.words is empty"):
        dispatch(compose_cfg(*FAST, "attention_maps.words=[]"))
    with pytest.raises(UserError, match=r"layer index 17 is out of range: this model has layers 1..16"):
        dispatch(compose_cfg(*FAST, "attention_maps.self_layer=17"))
    with pytest.raises(UserError, match=r"self_layer='5-6' must name one self-attention layer"):
        dispatch(compose_cfg(*FAST, "attention_maps.self_layer=5-6"))
    with pytest.raises(UserError, match=r"no cross layer among .*cross_layers='1-4' .* resolutions of this model's"):
        dispatch(compose_cfg(*FAST, "attention_maps.cross_layers=1-4", "attention_maps.cross_resolution=5"))


def test_perf_variants_in_one_process(compose_cfg, tiny_pipe):
    from experiments import perf

    cfg = compose_cfg("model=tiny", "probe.layers=[3,14]")
    calls, layers = perf.capture_calls(tiny_pipe, cfg, steps=2, n_prompts=2)
    edits = perf.edit_calls(tiny_pipe, cfg, steps=2)
    assert list(calls) == ["plain", "cross", "self"] and layers == [3, 14]
    assert list(edits) == ["diffusers", "plain", "fpe", "invert+sample", "fpe_real"]
    # the anchor: diffusers' own pipeline on the same latents gives our sampler's images
    assert torch.allclose(edits["diffusers"](), edits["plain"](), atol=1e-4)
    raw = perf.measure_rounds(calls, tiny_pipe.unet.device, rounds=2)
    rows = perf.summarise(raw, perf.CAPTURE_BASELINE)
    assert [r["variant"] for r in rows] == ["plain", "cross", "self"]
    assert all(len(r["rounds"]) == 2 and r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["peak"] > 0 for r in rows)
    self_row = rows[2]
    assert rows[0]["time_ratio"] == 1.0
    assert self_row["time_ratio_min"] <= self_row["time_ratio"] <= self_row["time_ratio_max"]
    table = perf.format_table(rows).splitlines()
    assert table[0].startswith("| variant | time s") and [x.split("|")[1].strip() for x in table[2:]] == [
        "plain", "cross", "self"]
    args = perf.build_parser().parse_args(["capture", "--model", "tiny", "--prompts", "3", "device=cpu"])
    assert (args.command, args.model, args.prompts, args.rounds, args.overrides) == ("capture", "tiny", 3, 5,
                                                                                     ["device=cpu"])


@pytest.mark.slow
def test_perf_cli_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "experiments.perf", "all", "--prompts", "2", "--steps", "2",
                        "--rounds", "1", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("model toy on cpu")  # the default model
    result = json.loads((tmp_path / "perf_all_toy_cpu.json").read_text())
    edit_rows = result["groups"]["edit"]["rows"]
    assert [x["variant"] for x in edit_rows] == ["diffusers", "plain", "fpe", "invert+sample", "fpe_real"]
    assert (tmp_path / "perf_all_toy_cpu.md").read_text().strip() == r.stdout.split("\n\nwrote")[0].strip()
    bad = subprocess.run([sys.executable, "-m", "experiments.perf", "edit", "--rounds", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
