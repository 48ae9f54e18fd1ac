import pytest
import torch
import torch.nn.functional as F

from probing.capture import CaptureSpec, capture_features, token_weights
from probing.prompts import build_prompts, load_family
from probing.store import FeatureStore
from sdattn.errors import UserError
from sdattn.layers import enumerate_layers, select_layers
from sdattn.maps import attention_with_pooled_map, pooled_self_attention
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import sample
from sdattn.text import word_token_positions

from .conftest import ROOT


def explicit_probs(pipe, layers, prompts, seeds, steps: int) -> dict:
    """Reference: {label: per step (B, N, M)}: softmax(QKᵀ·scale) of the conditional rows, mean over heads,
    materialised the slow way from the recorded q and k."""
    rec = Recorder([Tap(layers, "q", rows="cond"), Tap(layers, "k", rows="cond")])
    with rec.installed(pipe.unet):
        sample(pipe, prompts, seeds, num_inference_steps=steps, callbacks=[rec], progress=False, decode_images=False)
    scale = {x.label: pipe.unet.get_submodule(x.module_name).scale for x in layers}
    return {label: (q @ rec["k"][label].transpose(-1, -2) * scale[label]).softmax(-1).mean(2)
            for label, q in rec["q"].items()}  # (steps, B, N, M)


def test_cross_maps_equal_explicit_attention_probabilities(tiny_pipe):
    layers = select_layers(enumerate_layers(tiny_pipe.unet), [3, 14], "cross")
    prompts, words = ["a red car", "a blue dog"], [["red", "car"], ["blue", "a"]]
    feats = capture_features(tiny_pipe, layers, CaptureSpec(grid=4, steps=[1, 2]), prompts, [0, 1], words,
                             num_inference_steps=3, guidance_scale=7.5)
    store = explicit_probs(tiny_pipe, layers, prompts, [0, 1], 3)
    for layer in layers:
        probs = store[layer.label][1:3].mean(0)  # steps 1, 2: (B, N, L)
        # "red" is token 2 of "a red car"; "car" token 3; "blue" token 2 and "a" token 1 of "a blue dog"
        expected = torch.stack([probs[0][:, [2, 3]], probs[1][:, [2, 1]]]).transpose(1, 2)  # (B, T, N)
        expected = F.interpolate(expected.reshape(4, 1, layer.height, layer.width), size=(4, 4), mode="bilinear",
                                 align_corners=False).reshape(2, 2, 16)
        assert feats[layer.label].shape == (2, 2, 16)
        assert torch.allclose(feats[layer.label], expected, atol=1e-5)


def test_self_capture_equals_pooling_explicit_attention_probabilities(tiny_pipe):
    layers = select_layers(enumerate_layers(tiny_pipe.unet), [1, 11], "self")  # 16×16 and 8×8 query grids
    prompts = ["a red car", "a blue dog"]
    feats = capture_features(tiny_pipe, layers, CaptureSpec(kind="self", pool=2, steps="0,2"), prompts, [0, 1],
                             num_inference_steps=3, guidance_scale=7.5)
    store = explicit_probs(tiny_pipe, layers, prompts, [0, 1], 3)
    for layer in layers:
        probs = store[layer.label][[0, 2]].mean(0)  # (B, N, N)
        n, hw = layer.tokens, (layer.height, layer.width)
        by_keys = F.adaptive_avg_pool2d(probs.reshape(2 * n, 1, *hw), 2).reshape(2, n, 4)
        pooled = F.adaptive_avg_pool2d(by_keys.transpose(1, 2).reshape(8, 1, *hw), 2).reshape(2, 4, 4)
        assert torch.allclose(feats[layer.label], pooled.transpose(1, 2).reshape(2, 16), atol=1e-6)


def test_multi_token_word_is_averaged_and_absent_word_rejected(tiny_pipe):
    tok = tiny_pipe.tokenizer
    pos = word_token_positions(tok, "a zebra car", "zebra")  # not in the vocabulary: several tokens
    assert len(pos) > 1 and pos[0] == 2
    w = token_weights(tok, ["a zebra car"], [["zebra"]])
    assert torch.allclose(w[0, 0, pos], torch.full((len(pos),), 1 / len(pos))) and w.sum() == pytest.approx(1)
    with pytest.raises(UserError, match="word 'dog' is not in the prompt 'a red car'"):
        word_token_positions(tok, "a red car", "dog")


def test_pooled_self_attention_equals_pooling_the_full_map():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 64, 8, generator=g), torch.randn(2, 3, 64, 8, generator=g)
    full = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1).mean(1)  # (B, 64 q, 64 k) on an 8×8 grid
    pooled = full.reshape(2, 4, 2, 4, 2, 4, 2, 4, 2).mean((2, 4, 6, 8)).reshape(2, -1)
    for method in ("sdpa", "chunked"):
        got = pooled_self_attention(q, k, 8 ** -0.5, (8, 8), pool=4, chunk=10, method=method)
        assert torch.allclose(got, pooled, atol=1e-6)
    assert torch.allclose(pooled_self_attention(q, k, 8 ** -0.5, (8, 8), pool=4, chunk_bytes=4096), pooled, atol=1e-6)


def test_self_capture_shape(tiny_pipe):
    layers = select_layers(enumerate_layers(tiny_pipe.unet), [1, 7], "self")
    feats = capture_features(tiny_pipe, layers, CaptureSpec(kind="self", pool=2), ["a red car"], [0],
                             num_inference_steps=2)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"self-1": (1, 16), "self-7": (1, 16)}
    with pytest.raises(UserError, match="not a cross-attention layer"):
        capture_features(tiny_pipe, layers, CaptureSpec(kind="cross"), ["a red car"], [0], [["red"]],
                         num_inference_steps=1)


def test_probe_prompts_split_by_seed_with_articles():
    fam = load_family(ROOT / "datasets" / "probe" / "animal_park.yaml")
    prompts = build_prompts(fam, n_per_class=4, test_fraction=0.25)
    assert len(prompts) == 40 and len({p.label for p in prompts}) == 10
    assert any(p.prompt == "an giraffe standing in the park" for p in prompts) is False
    assert {p.prompt for p in prompts if p.label == "dog"} == {"a dog standing in the park"}
    assert {p.seed for p in prompts if p.split == "test"} == {3}
    with pytest.raises(UserError, match="class 'zebra' is not in family"):
        build_prompts(fam, 4, classes=["zebra"])


def test_feature_store_resumes_and_is_keyed_by_config(tmp_path):
    store = FeatureStore(tmp_path, {"a": 1})
    store.add(["x", "y"], {"f": torch.arange(4.0).reshape(2, 2)})
    again = FeatureStore(tmp_path, {"a": 1})
    assert again.missing(["x", "y", "z"]) == ["z"]
    assert torch.equal(again.load(["y", "x"])["f"], torch.tensor([[2.0, 3.0], [0.0, 1.0]]))
    assert FeatureStore(tmp_path, {"a": 2}).missing(["x"]) == ["x"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_pooled_self_attention_equals_adaptive_pooling_on_uneven_grids():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 30, 8, generator=g), torch.randn(2, 4, 30, 8, generator=g)  # a 5×6 grid
    full = (q @ k.transpose(-1, -2) * 0.3).softmax(-1).mean(1)  # (B, 30 q, 30 k)
    by_keys = F.adaptive_avg_pool2d(full.reshape(60, 1, 5, 6), 4).reshape(2, 30, 16)
    expected = F.adaptive_avg_pool2d(by_keys.transpose(1, 2).reshape(32, 1, 5, 6), 4).reshape(2, 16, 16)
    for method in ("sdpa", "chunked"):
        got = pooled_self_attention(q, k, 0.3, (5, 6), pool=4, chunk=7, method=method)
        assert torch.allclose(got, expected.transpose(1, 2).reshape(2, -1), atol=1e-6)


def test_attention_with_pooled_map_equals_sdpa_and_the_pooled_map():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 36, 8, generator=g) for _ in range(3))  # a 6×6 grid
    out, feat = attention_with_pooled_map(q, k, v, 0.35, (6, 6), pool=3, chunk_bytes=2048)  # several chunks
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.35), atol=1e-6)
    assert torch.allclose(feat, pooled_self_attention(q, k, 0.35, (6, 6), pool=3, method="sdpa"), atol=1e-6)
