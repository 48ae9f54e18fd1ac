"""The attention recorder (sdattn.recorder): recording changes nothing, q/k/v are the projections, and every
reduction equals the same reduction of maps materialised the slow way from the recorded q and k."""

import pytest
import torch
import torch.nn.functional as F

from sdattn.errors import UserError
from sdattn.hooks import AttentionHook
from sdattn.layers import enumerate_layers, select_layers
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import sample

PROMPTS, SEEDS, STEPS = ["a red car", "a blue dog"], [0, 1], 3


def run(pipe, taps, guidance_scale=7.5, prompts=PROMPTS, seeds=SEEDS):
    rec = Recorder(taps)
    with rec.installed(pipe.unet):
        out = sample(pipe, prompts, seeds, num_inference_steps=STEPS, guidance_scale=guidance_scale, callbacks=[rec],
                     progress=False, decode_images=False)
    return rec, out.latents


@pytest.fixture(scope="module")
def layers(tiny_pipe):
    all_layers = enumerate_layers(tiny_pipe.unet)
    return {"cross": select_layers(all_layers, [5], "cross")[0], "self": select_layers(all_layers, [11], "self")[0]}


def explicit(pipe, rec, layer):
    """(steps, B, H, N, M) softmax(QKᵀ·scale) from the recorded q and k of every row."""
    q, k = rec["q"][layer.label], rec["k"][layer.label]
    return (q @ k.transpose(-1, -2) * pipe.unet.get_submodule(layer.module_name).scale).softmax(-1)


def test_recording_every_layer_changes_nothing_and_restores_the_processors(tiny_pipe):
    plain = sample(tiny_pipe, PROMPTS, SEEDS, num_inference_steps=STEPS, progress=False, decode_images=False).latents
    before = dict(tiny_pipe.unet.attn_processors)
    all_layers = enumerate_layers(tiny_pipe.unet)
    rec, latents = run(tiny_pipe, [Tap(all_layers, "probs", heads="mean", rows="cond", over_steps="mean"),
                                   Tap(all_layers, "out", over_steps="last")])
    assert torch.equal(latents, plain)
    assert len(rec["probs"]) == len(rec["out"]) == 32
    assert all(tiny_pipe.unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with Recorder([Tap(all_layers[:2], "q")]).installed(tiny_pipe.unet):
            raise RuntimeError("boom")
    assert all(tiny_pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_recorded_q_k_v_are_the_layers_projections(tiny_pipe, layers):
    taps = [Tap(list(layers.values()), what) for what in ("q", "k", "v")]
    seen: dict = {}
    handles = []
    for layer in layers.values():
        attn = tiny_pipe.unet.get_submodule(layer.module_name)
        for what in ("q", "k", "v"):
            def keep(module, args, output, key=(layer.label, what), heads=attn.heads):
                b, n, _ = output.shape
                seen.setdefault(key, []).append(output.view(b, n, heads, -1).transpose(1, 2))
            handles.append(getattr(attn, f"to_{what}").register_forward_hook(keep))  # reference only
    try:
        rec, _ = run(tiny_pipe, taps)
    finally:
        for h in handles:
            h.remove()
    for (label, what), ref in seen.items():
        assert torch.equal(rec[what][label], torch.stack(ref)), (label, what)  # (steps, B, H, N, d)


def test_probability_reductions_equal_the_explicit_maps(tiny_pipe, layers):
    cross, self_ = layers["cross"], layers["self"]
    tokens = torch.zeros(2, 2, 77)
    tokens[0, 0, 2], tokens[0, 1, [1, 3]], tokens[1, 0, 2], tokens[1, 1, 3] = 1.0, 0.5, 1.0, 1.0
    steps = {0, 2}
    taps = [
        Tap([cross, self_], "q"), Tap([cross, self_], "k"),
        Tap([cross], "probs", name="full", rows="cond"),
        Tap([cross, self_], "probs", name="mean", rows="uncond", heads="mean", steps=steps, over_steps="mean"),
        Tap([cross], "probs", name="head", heads=3, over_steps="sum", float32=True),
        Tap([cross], "probs", name="words", rows="cond", heads="mean", tokens=tokens, size=(8, 8),
            over_steps="last"),
        Tap([cross], "probs", name="words_per_head", rows="cond", tokens=tokens[:1], over_steps="last"),
        Tap([self_], "probs", name="pooled", rows="cond", heads="mean", pool=2, over_steps="mean"),
        Tap([self_], "probs", name="pooled_per_head", rows=lambda layout: [layout.cond_row(1)], pool=2,
            transform=lambda layer, state, p: 2 * p),
    ]
    rec, _ = run(tiny_pipe, taps)
    p_cross, p_self = explicit(tiny_pipe, rec, cross), explicit(tiny_pipe, rec, self_)  # (S, 4, H, N, M)
    close = dict(atol=1e-6, rtol=1e-5)
    c = cross.label
    torch.testing.assert_close(rec["full"][c], p_cross[:, 2:], **close)
    for layer, p in ((cross, p_cross), (self_, p_self)):
        torch.testing.assert_close(rec["mean"][layer.label], p[[0, 2], :2].mean(2).mean(0), **close)
    torch.testing.assert_close(rec["head"][c], p_cross[:, :, 3].sum(0), **close)
    words = (p_cross[-1, 2:].mean(1) @ tokens.transpose(1, 2)).transpose(1, 2)  # (B, T, N) at the last step
    expected = F.interpolate(words.reshape(4, 1, cross.height, cross.width), size=(8, 8), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(rec["words"][c], expected.reshape(2, 2, 8, 8), **close)
    per_head = (p_cross[-1, 2:] @ tokens[:1, None].transpose(-1, -2)).transpose(-1, -2)  # (B, H, T, N)
    torch.testing.assert_close(rec["words_per_head"][c], per_head, **close)
    hw, n = (self_.height, self_.width), self_.tokens

    def pool(m):  # (..., N, N) → (..., 4, 4): adaptive average pooling of queries and keys to 2×2
        lead = m.shape[:-2]
        m = F.adaptive_avg_pool2d(m.reshape(-1, 1, *hw), 2).reshape(*lead, n, 4).transpose(-1, -2)
        return F.adaptive_avg_pool2d(m.reshape(-1, 1, *hw), 2).reshape(*lead, 4, 4).transpose(-1, -2)

    torch.testing.assert_close(rec["pooled"][self_.label], pool(p_self[:, 2:].mean(2)).mean(0), **close)
    torch.testing.assert_close(rec["pooled_per_head"][self_.label], pool(2 * p_self[:, 3:]), **close)


def test_grad_device_pause_and_clear(tiny_pipe, layers):
    cross = layers["cross"]
    rec = Recorder([Tap([cross], "probs", heads="mean", grad=True, over_steps="last", cpu=False),
                    Tap([cross], "out", name="kept", over_steps="last")])
    unet = tiny_pipe.unet
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with rec.installed(unet):
        unet(x, 500, encoder_hidden_states=ctx)
        maps, kept = rec["probs"][cross.label], rec["kept"][cross.label]
        (grad,) = torch.autograd.grad((maps ** 2).sum(), x)  # the observer's loss backpropagates to the input
        assert grad.abs().max() > 0 and kept.grad_fn is None
        rec.clear()
        rec.active = False
        unet(x, 500, encoder_hidden_states=ctx)
    assert rec["probs"] == {} and rec["kept"] == {}
    assert all(p.grad is None for p in unet.parameters())


def test_recording_around_an_editing_hook(tiny_pipe, layers):
    class Zero(AttentionHook):  # overwrites its query in place and returns zeros
        def attend(self, attn, q, k, v, mask):
            q.zero_()
            return torch.zeros_like(q)

    cross = layers["cross"]
    rec = Recorder([Tap([cross], "q", over_steps="last"), Tap([cross], "out", over_steps="last")])
    hooks = rec.hooks({cross: Zero})
    with Recorder([]).installed(tiny_pipe.unet, around=hooks) as outer:
        sample(tiny_pipe, ["a red car"], [0], num_inference_steps=1, callbacks=[outer], progress=False,
               decode_images=False)
    assert rec["q"][cross.label].abs().max() > 0  # as projected, before the editing hook overwrote it
    assert rec["out"][cross.label].abs().max() == 0  # as the editing hook returned it


def test_bad_taps_are_user_errors(tiny_pipe, layers):
    cross, self_ = layers["cross"], layers["self"]
    for kwargs, match in [(dict(what="pattern"), "what='pattern'"), (dict(heads="max"), "heads='max'"),
                          (dict(over_steps="median"), "over_steps"), (dict(rows="both"), "rows='both'"),
                          (dict(what="q", pool=2), "apply to attention probabilities"),
                          (dict(size=(4, 4)), "together with tokens"), (dict(pool=2), "needs self-attention")]:
        with pytest.raises(UserError, match=match):
            Tap([cross], **kwargs)
    with pytest.raises(UserError, match="two taps record 'probs' on cross-5"):
        Recorder([Tap([cross]), Tap([cross, self_])])
    rec, _ = run(tiny_pipe, [Tap([cross], rows="cond")], guidance_scale=1.0, prompts=["a car"], seeds=[0])
    assert rec["probs"][cross.label].shape[:2] == (STEPS, 1)  # without guidance every row is conditional
    with pytest.raises(UserError, match="no unconditional branch"):
        run(tiny_pipe, [Tap([cross], rows="uncond")], guidance_scale=1.0, prompts=["a car"], seeds=[0])
    with pytest.raises(RuntimeError, match="only inside"):
        Recorder([Tap([cross])]).on_step_begin(0, 1, 1, None)
