"""FPE correctness on the tiny model."""

import pytest
import torch
import torch.nn.functional as F

from editing.fpe import fpe_generated, fpe_real
from editing.images import load_image
from editing.inversion import ddim_invert
from editing.replace import AttentionReplace, TokenMapEdit
from editing.two_branch import SOURCE, TARGET, model_layers, replacement_edit
from sdattn.errors import UserError
from sdattn.hooks import AttentionHook
from sdattn.layers import select_layers
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import denoise, encode_image, encode_prompts, initial_latents, sample
from sdattn.steps import parse_steps

from .conftest import PHOTO, needs_photo

KW = dict(num_inference_steps=4, guidance_scale=7.5, progress=False)


def test_presets_and_step_ranges(tiny_pipe):
    layers = model_layers(tiny_pipe)
    assert [x.index for x in select_layers(layers, "paper")] == list(range(4, 15))
    assert [x.index for x in select_layers(layers, "official")] == list(range(3, 14))
    assert select_layers(layers, "none") == [] and len(select_layers(layers, "all")) == 16
    assert [x.index for x in select_layers(layers, [2, "5-6"], "cross")] == [2, 5, 6]
    assert parse_steps(0.8, 50, "fraction") == set(range(40)) and parse_steps([0.2, 0.5], 10, "fraction") == {2, 3, 4}
    for bad, match in [(1.5, r"outside \[0, 1\]"), ([0.6, 0.2], r"0 ≤ start ≤ end ≤ 1"), ("x", "is not a fraction"),
                       (float("nan"), r"outside \[0, 1\]"), ([0.1, True], "is not a fraction")]:
        with pytest.raises(UserError, match=match):
            parse_steps(bad, 50, "fraction")
    with pytest.raises(UserError, match="out of range: this model has layers 1..16"):
        select_layers(layers, "4-20")


def test_no_layer_selected_equals_plain_target_generation(tiny_pipe):
    edit = fpe_generated(tiny_pipe, "a white car", "a red car", seed=3, layers="none", self_replace_steps=0.8, **KW)
    pair = sample(tiny_pipe, ["a white car", "a red car"], seeds=[3, 3], **KW)  # same batch, no hooks
    assert torch.equal(edit.latents["edited"], pair.latents[1:]) and torch.equal(edit.images["edited"], pair.images[1:])
    alone = sample(tiny_pipe, ["a red car"], seeds=[3], **KW)  # batch of one: equal up to float noise
    assert (edit.latents["edited"] - alone.latents).abs().max() < 1e-5 * alone.latents.abs().max() * 10


def test_same_prompt_everywhere_replaced_is_the_source(tiny_pipe):
    edit = fpe_generated(tiny_pipe, "a red car", "a red car", seed=1, layers="all", self_replace_steps=1.0, **KW)
    assert torch.allclose(edit.latents["edited"], edit.latents["source"], atol=1e-5)


def test_replacement_changes_the_target_and_hooks_are_gone_after(tiny_pipe):
    before = sample(tiny_pipe, ["a red car"], seeds=[2], **KW).latents
    edit = fpe_generated(tiny_pipe, "a white dog", "a red car", seed=2, layers="all", self_replace_steps=1.0, **KW)
    assert (edit.latents["edited"] - before).abs().max() > 1e-3
    assert not any(isinstance(p, AttentionHook) for p in tiny_pipe.unet.attn_processors.values())
    after = sample(tiny_pipe, ["a red car"], seeds=[2], **KW).latents
    assert torch.equal(before, after)


def tapped_edit(pipe, source_prompt, target_prompt, layer, hook) -> list[tuple]:
    """Per step (q, k, v) of ``layer`` as projected (before ``hook``, which may overwrite rows) and its
    output (after ``hook``), recorded around the editing hook (factory) ``hook``."""
    rec = Recorder([Tap([layer], what) for what in ("q", "k", "v", "out")])
    replacement_edit(pipe, source_prompt, target_prompt, initial_latents(pipe, [0]), rec.hooks({layer: hook}), **KW)
    return list(zip(*(rec[what][layer.label] for what in ("q", "k", "v", "out"))))  # (B, H, N, d) each


def test_sdpa_identity_equals_explicit_source_map_and_only_target_cond_changes(tiny_pipe):
    (layer,) = select_layers(model_layers(tiny_pipe), [4], "self")
    steps = {0, 1}
    plain_log, hooked_log = (tapped_edit(tiny_pipe, "a white car", "a red car", layer,
                                         lambda lay, st, s=s: AttentionReplace(lay, st, [(SOURCE, TARGET)], s))
                             for s in (set(), steps))
    scale = tiny_pipe.unet.get_submodule(layer.module_name).scale
    # rows: [uncond src, uncond tgt, cond src, cond tgt]
    q, k, v, out = hooked_log[0]
    explicit = torch.softmax(q[2] @ k[2].transpose(-1, -2) * scale, -1) @ v[3]  # source map · target values
    assert torch.allclose(out[3], explicit, atol=1e-5)
    q0, k0, v0, out0 = plain_log[0]
    assert torch.allclose(out[:3], out0[:3], atol=1e-6)  # uncond branches and the source untouched
    assert not torch.allclose(out[3], out0[3], atol=1e-4)
    # step 2 is outside the active steps: the hook is a no-op there
    q2, k2, v2, out2 = hooked_log[2]
    assert torch.allclose(out2, F.scaled_dot_product_attention(q2, k2, v2, scale=scale), atol=1e-6)


@pytest.mark.parametrize("rows", [[(2, 3)], [(2, 3), (0, 1)], [(0, 1), (1, 2)]])  # FPE, MasaCtrl, chained
@pytest.mark.parametrize("tensors", [("query", "key"), ("key", "value")])
def test_row_injection_equals_gathered_rows(rows, tensors):
    """In-place row copies (eager) and the index_select fallback (rows both read and written) give
    SDPA on the gathered rows: row ``dst`` reads the ORIGINAL row ``src``."""
    from editing.replace import RowInjection
    from sdattn.hooks import BatchLayout, StepState
    from sdattn.layers import LayerId

    class Rows(RowInjection):
        def rows(self, layout):
            return rows

    layer = LayerId(index=1, kind="self", block="mid", height=1, width=2, name="x.attn1.processor")
    state = StepState(step=0, num_steps=1, layout=BatchLayout(n=2), step_index=torch.zeros(1, dtype=torch.long))
    hook = Rows(layer, state, steps={0})
    attn = type("Attn", (), {"scale": 0.5})()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 6, 2, 3, generator=g).transpose(1, 2) for _ in range(3))  # (B, H, N, d) views
    index = list(range(4))
    for src, dst in rows:
        index[dst] = src
    ref = {"query": q, "key": k, "value": v}
    ref = {n: t[index] if n in tensors else t for n, t in ref.items()}
    expected = F.scaled_dot_product_attention(ref["query"], ref["key"], ref["value"], scale=0.5)
    hook.tensors = tensors
    out = hook.attend(attn, q.clone(), k.clone(), v.clone(), None)
    assert torch.equal(out, expected)


def test_token_map_replace_and_subtract(tiny_pipe):
    (layer,) = select_layers(model_layers(tiny_pipe), [4], "cross")
    log = tapped_edit(tiny_pipe, "a black car", "a coral car", layer,
                      lambda lay, st: TokenMapEdit(lay, st, [(SOURCE, TARGET)], {0}, [3], [3], mode="subtract"))
    q, k, v, out = log[0]
    scale = tiny_pipe.unet.get_submodule(layer.module_name).scale
    probs = torch.softmax(q[3] @ k[3].transpose(-1, -2) * scale, -1)
    probs[..., 3] = 0
    assert torch.allclose(out[3], probs @ v[3], atol=1e-5)
    with pytest.raises(UserError, match="mode 'add'"):
        TokenMapEdit(layer, None, [(0, 1)], {0}, [1], [1], mode="add")


def test_ddim_inversion_reconstructs_the_input_latent(toy_pipe):
    # a rendered toy-world image, encoded, inverted with the empty prompt and sampled back
    from toyworld.world import load_world

    render = load_world().render("red", "star", "park", seed=11)
    img = torch.as_tensor(render.image).permute(2, 0, 1)[None].float() / 255
    z0 = encode_image(toy_pipe, img)
    traj = ddim_invert(toy_pipe, z0, "", num_inference_steps=50, progress=False)
    assert len(traj) == 51
    back = denoise(toy_pipe, traj[-1], encode_prompts(toy_pipe, [""]), None, 50, 1.0, progress=False)
    # documented tolerance (README): mean |error| ≤ 10 % of the latent's mean magnitude at 50 steps
    assert (back - z0).abs().mean() < 0.10 * z0.abs().mean()
    assert (traj[-1] - z0).abs().mean() > 0.5 * z0.abs().mean()  # and it really went to noise


@needs_photo
def test_fpe_real_on_the_shared_photo(tiny_pipe):
    img = load_image(PHOTO, (32, 32))
    assert img.shape == (1, 3, 32, 32) and 0 <= img.min() and img.max() <= 1
    res = fpe_real(tiny_pipe, img, "a red car", layers="official", self_replace_steps=0.8, **KW)
    assert set(res.images) == {"input", "reconstruction", "edited"}
    z0 = encode_image(tiny_pipe, img)
    # the source branch is re-anchored to the trajectory: its result stays near the input latent
    assert (res.latents["reconstruction"] - z0).abs().mean() < (res.latents["edited"] - z0).abs().mean() + 0.5
    nt = fpe_real(tiny_pipe, img, "a red car", source_prompt="a white car", inversion="null_text",
                  layers="official", self_replace_steps=0.8, null_text={"inner_steps": 2}, **KW)
    assert nt.images["edited"].shape == (1, 3, 32, 32)


@needs_photo
def test_edit_task_writes_files(compose_cfg, tmp_path):
    """edit=fpe / edit=fpe_real: the shorthands of task=edit method=fpe (FPE's settings: configs/method/fpe.yaml)."""
    from safetensors.torch import load_file

    from experiments.run import dispatch

    cfg = compose_cfg("edit=fpe", "seed=42", "model.steps=3")
    assert (cfg.method.name, cfg.method.self_replace_steps) == ("fpe", 0.8)
    files = dispatch(cfg)["files"]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"source.png", "edited.png", "grid.png",
                                                              "latents.safetensors"}
    assert set(load_file(files["latents"])) == {"source", "edited"}
    dispatch(compose_cfg("edit=fpe_real", f"edit.image={PHOTO}", "model.steps=3"))
    assert set(load_file(files["latents"])) == {"input", "edited"}  # the photo's VAE latent, the edit's final one
    with pytest.raises(UserError, match="edit.image is required for edit=fpe_real"):
        dispatch(compose_cfg("edit=fpe_real"))
    with pytest.raises(UserError, match=r"method.self_replace_steps=1.5 is outside \[0, 1\]"):
        dispatch(compose_cfg("edit=fpe", "method.self_replace_steps=1.5", "model.steps=2"))


@pytest.mark.parametrize("experiment,rows", [
    ("fig4_cross", ["cross 1-4", "cross 5-8", "cross 9-12", "cross 13-16", "cross 4-14", "cross all"]),
    ("fig4_self", ["self 1-3", "self 4-8", "self 9-14", "self 15-16", "self 4-14", "self all"]),
    ("fig5_tokens", ["<- a", "<- car", "- a", "- car"]),
])
def test_ablation_grids(experiment, rows, compose_cfg, tmp_path):
    from PIL import Image

    from experiments.run import dispatch

    res = dispatch(compose_cfg(f"experiment={experiment}", "ablation.num_inference_steps=2", "ablation.seeds=[0]",
                               "ablation.cell=64"))
    assert res["rows"] == rows
    img = Image.open(res["file"])
    assert img.size[1] == (len(rows) + 2) * (64 + 18)
    if experiment == "fig4_cross":  # replacing every cross layer at every step with a word swap changes the image
        assert not torch.equal(res["latents"]["cross all"][0], res["latents"]["cross 1-4"][0])


def test_toy_edit_evaluation_runs(compose_cfg, tmp_path):
    import json

    from experiments.run import dispatch

    metrics = dispatch(compose_cfg("experiment=eval_toy_edit", "toy_edit.n=2", "model.steps=2"))
    saved = json.loads((tmp_path / "out" / "toy_edit_metrics.json").read_text())
    assert saved == metrics and metrics["n_pairs"] == 2
    assert 0 <= metrics["fpe_color_accuracy"] <= 1
    # tiny's random images: the checker may read no object; such pairs have no IoU (counted), never 0 or 1
    iou, unreadable = metrics["iou_source_vs_fpe"], metrics["iou_unreadable_fpe"]
    assert 0 <= unreadable <= 2 and (iou is None) == (unreadable == 2) and (iou is None or 0 <= iou <= 1)


def test_perf_edit_variants(compose_cfg, tiny_pipe):
    from experiments import perf

    calls = perf.edit_calls(tiny_pipe, compose_cfg(), steps=2)
    rows = perf.summarise(perf.measure_rounds(calls, tiny_pipe.unet.device, rounds=1), perf.EDIT_BASELINE)
    assert [r["variant"] for r in rows] == ["diffusers", "plain", "fpe", "invert+sample", "fpe_real"]
    assert all(r["seconds"] > 0 and r["peak"] > 0 for r in rows)
    by_name = {r["variant"]: r for r in rows}
    assert by_name["fpe_real"]["baseline"] == "invert+sample" and by_name["fpe"]["baseline"] == "plain"
    real = by_name["fpe_real"]
    assert real["time_ratio"] == pytest.approx(real["seconds"] / by_name["invert+sample"]["seconds"])
    table = perf.format_table(rows).splitlines()
    assert [x.split("|")[1].strip() for x in table[2:]] == ["diffusers", "plain", "fpe", "invert+sample", "fpe_real"]


def test_toy_model_rejects_words_outside_its_vocabulary(compose_cfg):
    from experiments.run import dispatch

    cfg = compose_cfg("model=toy", "edit=fpe", "edit.source_prompt=a photo of a white car", "model.steps=2")
    with pytest.raises(UserError, match=r"outside this model's vocabulary: \['photo', 'of'\]; vocabulary: a, an, "):
        dispatch(cfg)


def test_null_text_inversion_leaves_no_gradients_on_the_model(tiny_pipe):
    from editing.inversion import ddim_invert, null_text_inversion
    from sdattn.sampling import initial_latents

    tiny_pipe.unet.zero_grad(set_to_none=True)
    traj = ddim_invert(tiny_pipe, initial_latents(tiny_pipe, [0]), "a red car", 2, progress=False)
    out = null_text_inversion(tiny_pipe, traj, "a red car", 7.5, inner_steps=2, progress=False)
    assert len(out) == 2 and all(not u.requires_grad for u in out)
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    assert all(p.grad is None for p in tiny_pipe.text_encoder.parameters())
