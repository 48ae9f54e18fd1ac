"""Plug-and-Play and DiffEdit on the tiny (and toy) model."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from editing.baselines.diffedit import diffedit_inpaint, diffedit_mask
from editing.baselines.pnp import FeatureInject, QKInject, pnp_feature_module, sampler_trajectory
from editing.inversion import ddim_invert
from editing.two_branch import SOURCE, TARGET, model_layers, replacement_edit
from evaluation.datasets import EditExample
from sdattn.errors import UserError
from sdattn.hooks import BatchLayout, StepState
from sdattn.layers import select_layers
from sdattn.sampling import decode, encode_image, initial_latents

from .conftest import ROOT

EX = EditExample(id="0", source_prompt="a black car", target_prompt="a red car")
STEPS = dict(num_inference_steps=4, guidance_scale=7.5)
DIFFEDIT = OmegaConf.load(ROOT / "configs" / "method" / "diffedit.yaml")  # the settings' only defaults
MASK = {k: DIFFEDIT[k] for k in ("mask_encode_strength", "num_maps_per_mask", "mask_thresholding_ratio")}


PNP = dict(inversion_steps=STEPS["num_inference_steps"])  # the official 999 take minutes on the tiny model


def _cfg(**kw):
    return {**STEPS, **kw}


def _processor_classes(pipe):
    return {k: type(v) for k, v in pipe.unet.attn_processors.items()}


def _forward_hooks(pipe):
    return [n for n, m in pipe.unet.named_modules() if m._forward_hooks]


def _check_pair(src, edited, like=None):
    for x in (src, edited):
        assert x.shape == (like.shape if like is not None else src.shape) and x.shape[:2] == (1, 3)
        assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize("name", ["pnp", "diffedit"])
def test_end_to_end_generated_and_real_and_hooks_removed(tiny_pipe, make_method, name):
    before = _processor_classes(tiny_pipe)
    edit = make_method(name, **_cfg(**(PNP if name == "pnp" else {})))
    src, edited = edit(tiny_pipe, EX, 0)
    _check_pair(src, edited)
    image = torch.rand(src.shape, generator=torch.Generator().manual_seed(0))
    out_src, out_edit = edit(tiny_pipe, EX, 0, image=image)
    assert out_src is image
    _check_pair(out_src, out_edit, like=image)
    assert _processor_classes(tiny_pipe) == before and _forward_hooks(tiny_pipe) == []


def test_pnp_presets_derive_from_the_model(tiny_pipe, toy_pipe):
    tiny = model_layers(tiny_pipe)
    assert [x.index for x in select_layers(tiny, "decoder")] == list(range(9, 17))  # official SD 1.5 layers
    assert [x.index for x in select_layers(tiny, "10-12")] == [10, 11, 12] and select_layers(tiny, "none") == []
    toy = select_layers(model_layers(toy_pipe), "decoder")  # up.1 has 2 attentions, up.2 has 2: drop up.1's first
    assert [x.index for x in toy] == [5, 6, 7] and toy[0].name.startswith("up_blocks.1.attentions.1.")
    auto = "up_blocks.1.resnets.1"
    assert pnp_feature_module(tiny_pipe, "auto")[0] == pnp_feature_module(toy_pipe, "auto")[0] == auto
    name, module = pnp_feature_module(tiny_pipe, "up_blocks.2.resnets.0")
    assert module is tiny_pipe.unet.up_blocks[2].resnets[0].conv2


def test_pnp_without_injection_equals_plain_pair_and_injection_changes_target(tiny_pipe, make_method):
    negative = OmegaConf.load(ROOT / "configs" / "model_settings" / "sd1x.yaml").pnp_negative_prompt
    assert negative == "ugly, blurry, black, low res, unrealistic"  # official, not ""
    plain = replacement_edit(tiny_pipe, EX.source_prompt, EX.target_prompt, initial_latents(tiny_pipe, [5]), {},
                             negative_prompt=negative, progress=False, **STEPS)
    src, edited = make_method("pnp", **_cfg(feature_steps=0, attn_layers="none"))(tiny_pipe, EX, 5)
    images = decode(tiny_pipe, plain)  # one batch, as edit_pnp decodes it
    assert torch.equal(src, images[:1]) and torch.equal(edited, images[1:])
    for kw in (dict(feature_steps=1.0, attn_layers="none"), dict(feature_steps=0, attn_steps=1.0), {}):
        src2, edited2 = make_method("pnp", **_cfg(**kw))(tiny_pipe, EX, 5)
        assert torch.equal(src2, src)  # the source branch is never changed
        assert (edited2 - edited).abs().max() > 1e-3, kw


def test_qk_hook_gives_both_target_rows_the_source_map():
    state = StepState(step=0, layout=BatchLayout(n=2, cfg=True))
    hook = QKInject(None, state, steps={0})
    attn = SimpleNamespace(scale=0.5)
    q, k, v = (torch.randn(4, 2, 6, 3) for _ in range(3))
    # attend overwrites injected rows of its q/k in place (in a processor: this call's own projections)
    out = hook.attend(attn, q.clone(), k.clone(), v.clone(), None)
    plain = F.scaled_dot_product_attention(q, k, v, scale=0.5)
    s = state.layout.cond_row(SOURCE)
    for t in (state.layout.cond_row(TARGET), state.layout.uncond_row(TARGET)):
        want = F.scaled_dot_product_attention(q[s], k[s], v[t], scale=0.5)
        assert torch.allclose(out[t], want, atol=1e-6) and not torch.allclose(out[t], plain[t], atol=1e-3)
    for r in (s, state.layout.uncond_row(SOURCE)):
        assert torch.allclose(out[r], plain[r], atol=1e-6)
    state.step = 1  # inactive step: plain attention
    assert torch.allclose(hook.attend(attn, q, k, v, None), plain, atol=1e-6)


def test_feature_hook_replaces_both_target_rows_with_source_cond_row():
    module = torch.nn.Identity()
    feat = FeatureInject(module, steps={1})
    x = torch.randn(4, 3, 2, 2)  # [uncond src, uncond tgt, cond src, cond tgt]
    lay = BatchLayout(n=2, cfg=True)
    with feat.installed():
        feat.on_step_begin(0, 999, 2, lay)
        assert torch.equal(module(x), x)  # inactive step: untouched
        feat.on_step_begin(1, 500, 2, lay)
        y = module(x)
        src = lay.cond_row(SOURCE)
        for row in (lay.cond_row(TARGET), lay.uncond_row(TARGET)):
            assert torch.equal(y[row], x[src])
        assert torch.equal(y[lay.uncond_row(SOURCE)], x[lay.uncond_row(SOURCE)]) and torch.equal(y[src], x[src])
        feat.on_step_begin(1, 500, 2, BatchLayout(n=2, cfg=False))  # no guidance: the cond target row only
        x2 = torch.randn(2, 3, 2, 2)
        assert torch.equal(module(x2)[TARGET], x2[SOURCE])
    assert not module._forward_hooks and torch.equal(module(x), x)


def test_pnp_bad_config_names_the_value(tiny_pipe, make_method):
    before = _processor_classes(tiny_pipe)
    with pytest.raises(UserError, match=r"'nope'.*up_blocks\.1\.resnets\.1"):
        make_method("pnp", **_cfg(feature_block="nope"))(tiny_pipe, EX, 0)
    with pytest.raises(UserError, match="1.5"):
        make_method("pnp", **_cfg(attn_steps=1.5))(tiny_pipe, EX, 0)
    with pytest.raises(UserError, match="out of range"):
        make_method("pnp", **_cfg(attn_layers="9-40"))(tiny_pipe, EX, 0)
    assert _processor_classes(tiny_pipe) == before and _forward_hooks(tiny_pipe) == []


def test_pnp_anchors_from_a_longer_inversion_and_the_cache(tiny_pipe, make_method, tmp_path):
    z0 = initial_latents(tiny_pipe, [1])
    traj = ddim_invert(tiny_pipe, z0, "", 8, progress=False)  # levels 1, 126, 251, ..., 876
    anchors = sampler_trajectory(tiny_pipe, traj, 8, 4)  # sampling at 751, 501, 251, 1
    assert [a is traj[k] for a, k in zip(anchors, [0, 1, 3, 5, 7])] == [True] * 5
    with pytest.raises(UserError, match="inversion_steps 3"):
        sampler_trajectory(tiny_pipe, ddim_invert(tiny_pipe, z0, "", 3, progress=False), 3, 4)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cache = tmp_path / "pnp_inversion"
    edit = make_method("pnp", **_cfg(inversion_steps=8, inversion_cache=str(cache)))
    first = edit(tiny_pipe, EX, 0, image=image)
    assert edit.info["pnp_inversion_cached"] is False and edit.info["pnp_inversion_s"] > 0
    assert len(list(cache.glob("*.safetensors"))) == 1
    again = edit(tiny_pipe, EX, 0, image=image)
    assert edit.info["pnp_inversion_cached"] is True and torch.equal(again[1], first[1])
    other = make_method("pnp", **_cfg(inversion_steps=4, inversion_cache=str(cache)))
    other(tiny_pipe, EX, 0, image=image)  # another setting: another entry
    assert other.info["pnp_inversion_cached"] is False and len(list(cache.glob("*.safetensors"))) == 2
    uncached = make_method("pnp", **_cfg(inversion_steps=8, inversion_cache=None))
    assert torch.equal(uncached(tiny_pipe, EX, 0, image=image)[1], first[1])


def test_ddim_invert_until_is_a_prefix(tiny_pipe):
    z0 = initial_latents(tiny_pipe, [1])
    full = ddim_invert(tiny_pipe, z0, "a red car", 4, progress=False)
    part = ddim_invert(tiny_pipe, z0, "a red car", 4, progress=False, until=3)
    assert len(full) == 5 and len(part) == 4
    assert all(torch.equal(a, b) for a, b in zip(part, full))


def test_diffedit_mask_is_binary_and_empty_for_identical_prompts(tiny_pipe):
    z0 = initial_latents(tiny_pipe, [2])
    mask = diffedit_mask(tiny_pipe, z0, "a black car", "a red car", seed=0, **{**MASK, "num_maps_per_mask": 3}, **STEPS)
    assert mask.shape == (1, 1, *z0.shape[-2:])
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.sum() < mask.numel()
    same = diffedit_mask(tiny_pipe, z0, "a red car", "a red car", seed=0, **{**MASK, "num_maps_per_mask": 3}, **STEPS)
    assert same.shape == mask.shape and not same.any()


def test_diffedit_empty_mask_returns_the_inverted_source(tiny_pipe):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    z0 = encode_image(tiny_pipe, image)
    mask = torch.zeros(1, 1, *z0.shape[-2:])
    kw = dict(inpaint_strength=DIFFEDIT.inpaint_strength, inversion_guidance_scale=7.5)
    post = diffedit_inpaint(tiny_pipe, z0, mask, EX.source_prompt, EX.target_prompt, **STEPS, **kw,
                            blend_latent="post_step")
    assert torch.equal(post, z0)
    # the reference pipeline's blend: the last step keeps the level-1 inverted latent (guided inversion)
    pre = diffedit_inpaint(tiny_pipe, z0, mask, EX.source_prompt, EX.target_prompt, **STEPS, **kw,
                           blend_latent="pre_step")
    level1 = ddim_invert(tiny_pipe, z0, EX.source_prompt, STEPS["num_inference_steps"], progress=False, until=1,
                         guidance_scale=7.5)[1]
    assert torch.equal(pre, level1) and (pre - z0).abs().max() > 1e-4
    full = diffedit_inpaint(tiny_pipe, z0, torch.ones_like(mask), EX.source_prompt, EX.target_prompt, **STEPS,
                            **kw, blend_latent=DIFFEDIT.blend_latent)
    assert (full - z0).abs().max() > 1e-3


@pytest.mark.parametrize("key,value", [("inpaint_strength", 1.5), ("mask_encode_strength", 0.0),
                                       ("num_maps_per_mask", 0), ("mask_thresholding_ratio", -1.0)])
def test_diffedit_bad_config_names_the_value(tiny_pipe, make_method, key, value):
    with pytest.raises(UserError, match=rf"method\.{key} {value}"):
        make_method("diffedit", **_cfg(**{key: value}))(tiny_pipe, EX, 0)


@pytest.mark.parametrize("name,extra", [("pnp", {**PNP, "negative_prompt": ""}),  # the toy model's setting
                                        ("diffedit", {"num_maps_per_mask": 2})])
def test_toy_model_runs(toy_pipe, make_method, name, extra):
    ex = EditExample(id="0", source_prompt=EX.source_prompt, target_prompt=EX.target_prompt)
    src, edited = make_method(name, **_cfg(**extra))(toy_pipe, ex, 0)
    _check_pair(src, edited)
    assert _forward_hooks(toy_pipe) == []
