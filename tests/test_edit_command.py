"""One edit command for every method (task=edit method=<name>; edit.methods=[...] → compare.png) on the
tiny model, few steps."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from editing.fpe import fpe_generated
from editing.inversion import ddim_invert, shared_inversions
from editing.methods import DecodedLatents, Pair, run_method
from experiments.run import dispatch
from sdattn.errors import UserError
from sdattn.sampling import decode, encode_image

from .conftest import PHOTO, needs_photo

FOUR = "edit.methods=[fpe,p2p,masactrl,pnp]"
FAST = ["model.steps=2", "edit.clip=tiny-random", "edit.cell=64"]


@pytest.fixture
def edit(compose_cfg, tiny_pipe, monkeypatch):
    """edit(*overrides) → the edit task's result on the (shared) tiny model."""
    import experiments.tasks.edit as task

    monkeypatch.setattr(task, "load_model", lambda cfg: tiny_pipe)
    return lambda *overrides: dispatch(compose_cfg("task=edit", *FAST, *overrides))


def test_any_method_on_one_pair_writes_source_edited_grid_latents(edit, tiny_pipe, tmp_path):
    res = edit("method=p2p", "edit.source_prompt=a red car", "edit.target_prompt=a blue car")
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"source.png", "edited.png", "grid.png", "latents.safetensors"}
    latents = load_file(res["files"]["latents"])
    assert set(latents) == {"source", "edited"} and latents["edited"].shape[:2] == (1, 4)
    run = res["runs"][0]
    torch.testing.assert_close(decode(tiny_pipe, latents["edited"]), run.edited, atol=1e-5, rtol=0)
    assert Image.open(out / "grid.png").size == (2 * 64, 64 + 18)


def test_the_generic_path_equals_fpe_itself(tiny_pipe, make_method):
    """FPE through run_method (settings from configs/method/fpe.yaml) = fpe_generated with those settings;
    the recorded latents are the sampler's final ones."""
    run = run_method(tiny_pipe, "fpe", make_method("fpe", num_inference_steps=2, layers="all"),
                     Pair("a white car", "a red car"), seed=3)
    ref = fpe_generated(tiny_pipe, "a white car", "a red car", 3, layers="all", self_replace_steps=0.8,
                        num_inference_steps=2, guidance_scale=7.5, progress=False)
    assert torch.equal(run.edited, ref.images["edited"]) and torch.equal(run.source, ref.images["source"])
    for key in ("source", "edited"):  # ÷ then × the VAE's scaling factor: equal up to float rounding
        torch.testing.assert_close(run.latents[key], ref.latents[key].cpu(), rtol=1e-6, atol=1e-6)
    assert run.seconds > 0 and not tiny_pipe.vae.decoder._forward_hooks  # the recorder's hooks are gone


def test_decoded_latents_trace_an_image_to_its_latent(tiny_pipe):
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    recorder = DecodedLatents(tiny_pipe)
    with recorder.recording():
        images = decode(tiny_pipe, z)
    torch.testing.assert_close(recorder.latent_of(images[1:2]), z[1:2], rtol=1e-6, atol=1e-6)
    assert recorder.latent_of(torch.zeros_like(images[:1])) is None


def test_methods_side_by_side_on_a_generated_pair(edit, tmp_path):
    res = edit(FOUR, "seed=5")
    out = tmp_path / "out"
    assert [r["method"] for r in res["rows"]] == ["fpe", "p2p", "masactrl", "pnp"]
    for r in res["rows"]:
        assert r["time_s"] > 0 and 0 <= r["clip_score"] <= 100 and -1 <= r["clip_directional"] <= 1
        assert r["shared_inversion_s"] == 0  # nothing inverted
        assert {p.name for p in (out / r["method"]).iterdir()} >= {"source.png", "edited.png", "latents.safetensors"}
    # one seed: one source, but PnP samples its source with its own negative prompt (SD-1.x: "ugly, blurry, ...")
    assert {r["method"]: r["same_source"] for r in res["rows"]} == {"fpe": True, "p2p": True, "masactrl": True,
                                                                     "pnp": False}
    assert Image.open(out / "compare.png").size[0] == (2 + 4) * 64  # source, target prompt, 4 methods
    saved = json.loads((out / "compare.json").read_text())
    assert saved["seed"] == 5 and saved["methods"] == res["rows"]
    # each method's own settings: the same as its benchmark config
    assert saved["settings"]["p2p"]["cross_replace_steps"] == 0.8
    assert saved["settings"]["pnp"]["attn_steps"] == 0.5 and "self_replace_steps" not in saved["settings"]["pnp"]


@needs_photo
def test_methods_side_by_side_on_a_real_image_share_one_inversion(edit, tiny_pipe, tmp_path):
    res = edit(FOUR, f"edit.image={PHOTO}", "edit.source_prompt=a car", "edit.target_prompt=a red car",
               "edit.settings={pnp: {inversion_steps: 2}, p2p: {null_text: {inner_steps: 1}}}")
    runs = {r.name: r for r in res["runs"]}
    assert all(torch.equal(r.source, runs["fpe"].source) for r in runs.values())  # the photo itself
    assert set(runs["fpe"].latents) == {"input", "edited"}
    shared = {r["method"]: r["shared_inversion_s"] for r in res["rows"]}
    assert shared["fpe"] == 0 and shared["masactrl"] > 0  # both invert with "" at model.steps: one inversion
    assert shared["pnp"] > 0  # its inversion_steps set to model.steps: the same inversion again
    assert shared["p2p"] == 0  # inverts with the caption: its own
    # the shared inversion is the one masactrl computes alone
    alone = run_method(tiny_pipe, "masactrl", res["editors"]["masactrl"], Pair("a car", "a red car"), 0,
                       runs["fpe"].source)
    torch.testing.assert_close(alone.edited, runs["masactrl"].edited, atol=1e-6, rtol=0)


def test_shared_inversions_compute_each_once(tiny_pipe):
    z = encode_image(tiny_pipe, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    with shared_inversions() as cache:
        a = ddim_invert(tiny_pipe, z, "", 2, progress=False)
        b = ddim_invert(tiny_pipe, z.clone(), "", 2, progress=False)
        c = ddim_invert(tiny_pipe, z, "a car", 2, progress=False)
    assert a[-1] is b[-1] and len(cache.trajectories) == 2 and cache.reused_s > 0
    assert not torch.equal(a[-1], c[-1])
    torch.testing.assert_close(ddim_invert(tiny_pipe, z, "", 2, progress=False)[-1], a[-1])  # outside: computed


@pytest.mark.parametrize("overrides,message", [
    ([], "task=edit needs a method"),
    (["edit.methods=[fpe,nope]"], "method 'nope' is not a config of configs/method/"),
    (["edit.methods=[fpe,fpe]"], "edit.methods names 'fpe' twice"),
    (["edit.methods=[fpe]", "edit.settings={p2p: {refine: false}}"], "edit.settings.p2p: 'p2p' is not one of"),
    (["edit.methods=[fpe,p2p]", "edit.settings={p2p: {refin: false}}"], "method.refin is not a setting of method"),
    (["method=fpe", "edit.image=/no/such.png"], "image '/no/such.png' does not exist"),
])
def test_bad_edit_commands_are_one_line(edit, overrides, message):
    with pytest.raises(UserError, match=message) as e:
        edit(*overrides)
    assert "\n" not in str(e.value)
