"""DINO self-similarity structure distance (evaluation/structure.py) on a tiny random ViT."""

import pytest
import torch
import torch.nn.functional as F

from evaluation.structure import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StructureDistance,
    load_structure,
    preprocess_dino,
    self_similarity_from_keys,
    structure_distance_from_keys,
    tiny_dino,
)
from sdattn.errors import ModelLoadError, UserError


@pytest.fixture(scope="module")
def sd():
    return tiny_dino(seed=0)


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_tiny_model_shapes(sd):
    keys = sd.keys(_images(2))
    cfg = sd.model.config
    tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2  # CLS included
    assert keys.shape == (2, tokens, cfg.hidden_size) and keys.dtype == torch.float32
    assert sd.self_similarity(_images(2)).shape == (2, tokens, tokens)


def test_identical_images_distance_zero(sd):
    x = _images(3)
    d = sd(x, x.clone())
    assert d.shape == (3,) and d.dtype == torch.float32
    assert torch.all(d.abs() < 1e-10)


def test_different_images_positive_and_symmetric(sd):
    a, b = _images(2, seed=1), _images(2, seed=2)
    d_ab, d_ba = sd(a, b), sd(b, a)
    assert torch.all(d_ab > 1e-6)
    torch.testing.assert_close(d_ab, d_ba)


def test_keys_equal_the_last_layer_key_projection(sd):
    """Keys = output of the LAST layer's key Linear during an ordinary forward pass (captured by a hook)."""
    from evaluation.structure import _key_linear, _vit_layers

    x = _images(2, size=48, seed=3)  # not the model size: exercises the resize too
    captured = []
    layers = _vit_layers(sd.model)
    handle = _key_linear(layers[-1]).register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            sd.model(pixel_values=preprocess_dino(x, sd.image_size))
    finally:
        handle.remove()
    assert len(captured) == 1
    torch.testing.assert_close(sd.keys(x), captured[0].float(), rtol=1e-5, atol=1e-6)
    # and it is not the first layer's keys (the hidden-state index matters)
    first = []
    handle = _key_linear(layers[0]).register_forward_hook(lambda m, i, o: first.append(o.detach()))
    try:
        with torch.no_grad():
            sd.model(pixel_values=preprocess_dino(x, sd.image_size))
    finally:
        handle.remove()
    assert not torch.allclose(sd.keys(x), first[0].float(), atol=1e-4)


def test_keys_equal_manual_layer_by_layer_computation(sd):
    x = _images(1, seed=4)
    m = sd.model
    from evaluation.structure import _key_linear, _vit_layers

    layers = _vit_layers(m)
    pixels = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = m.embeddings(pixels)
        for layer in layers[:-1]:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
        expected = _key_linear(layers[-1])(layers[-1].layernorm_before(h))
    torch.testing.assert_close(sd.keys(x), expected, rtol=1e-5, atol=1e-6)


def test_self_similarity_diagonal_one_and_bounded(sd):
    s = sd.self_similarity(_images(2, seed=5))
    torch.testing.assert_close(torch.diagonal(s, dim1=1, dim2=2), torch.ones(2, s.shape[1]))
    assert s.min() >= -1 - 1e-5 and s.max() <= 1 + 1e-5
    torch.testing.assert_close(s, s.transpose(1, 2))


def test_batch_equals_per_image(sd):
    a, b = _images(3, seed=6), _images(3, seed=7)
    batch = sd(a, b)
    single = torch.cat([sd(a[i:i + 1], b[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sd.keys(a), torch.cat([sd.keys(a[i:i + 1]) for i in range(3)]),
                               rtol=1e-4, atol=1e-6)


def test_distance_formula_by_hand(sd):
    a, b = _images(2, seed=8), _images(2, seed=9)
    ka, kb = sd.keys(a), sd.keys(b)
    sa = F.normalize(ka, dim=-1) @ F.normalize(ka, dim=-1).transpose(1, 2)
    sb = F.normalize(kb, dim=-1) @ F.normalize(kb, dim=-1).transpose(1, 2)
    by_hand = torch.stack([((sa[i] - sb[i]) ** 2).sum() / sa[i].numel() for i in range(2)])
    torch.testing.assert_close(sd(a, b), by_hand, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(structure_distance_from_keys(ka, kb), by_hand, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(self_similarity_from_keys(ka), sa, rtol=1e-5, atol=1e-6)


def test_pure_function_known_values():
    # two tokens: orthogonal (S off-diagonal 0) vs parallel (1) → mean of squared diff = 2 / 4
    ka = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    kb = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    torch.testing.assert_close(structure_distance_from_keys(ka, kb), torch.tensor([0.5]))
    with pytest.raises(UserError):
        structure_distance_from_keys(ka, kb[:, :1])


def test_uint8_input_accepted(sd):
    x = (_images(2, seed=10) * 255).round().to(torch.uint8)
    y = (_images(2, seed=11) * 255).round().to(torch.uint8)
    torch.testing.assert_close(sd(x, y), sd(x.float() / 255, y.float() / 255))


def test_preprocess_imagenet_normalisation():
    x = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 8, 8).clone()
    p = preprocess_dino(x, 8)
    torch.testing.assert_close(p, torch.zeros_like(p), atol=1e-6, rtol=0)
    assert preprocess_dino(_images(1, size=40), 32).shape == (1, 3, 32, 32)


def test_bad_inputs(sd):
    with pytest.raises(UserError, match=r"\(B, 3, H, W\)"):
        sd(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    with pytest.raises(UserError):
        sd.keys(torch.rand(1, 1, 32, 32))
    with pytest.raises(UserError, match="must match"):
        sd(_images(2), _images(1))


def test_from_pretrained_missing_model_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        StructureDistance.from_pretrained("definitely/not-a-model")
    msg = str(err.value)
    assert "\n" not in msg and "definitely/not-a-model" in msg and "huggingface-cli download" in msg


def test_load_structure():
    assert load_structure(None) is None
    assert load_structure("none") is None
    assert isinstance(load_structure("tiny-random"), StructureDistance)
    with pytest.raises(ModelLoadError):
        load_structure("definitely/not-a-model")


def test_checkpoint_with_the_original_dino_weight_names_loads(tmp_path):
    """facebook/dino-vitb8 stores transformers-4 names (encoder.layer.N.attention.attention.key, a pooler);
    a folder written that way must load to the same keys (transformers 5 renames them on load)."""
    import re

    from safetensors.torch import save_file

    from evaluation.structure import StructureDistance

    ref = tiny_dino()
    ref.model.save_pretrained(tmp_path)  # config.json (+ weights, replaced below)
    legacy = {
        r"^layers\.(\d+)\.attention\.q_proj": r"encoder.layer.\1.attention.attention.query",
        r"^layers\.(\d+)\.attention\.k_proj": r"encoder.layer.\1.attention.attention.key",
        r"^layers\.(\d+)\.attention\.v_proj": r"encoder.layer.\1.attention.attention.value",
        r"^layers\.(\d+)\.attention\.o_proj": r"encoder.layer.\1.attention.output.dense",
        r"^layers\.(\d+)\.mlp\.fc1": r"encoder.layer.\1.intermediate.dense",
        r"^layers\.(\d+)\.mlp\.fc2": r"encoder.layer.\1.output.dense",
        r"^layers\.(\d+)\.": r"encoder.layer.\1.",
    }
    state = {}
    for name, value in ref.model.state_dict().items():
        for pattern, repl in legacy.items():
            name = re.sub(pattern, repl, name)
        state[name] = value.contiguous()
    assert "encoder.layer.0.attention.attention.key.weight" in state
    hidden = ref.model.config.hidden_size
    state["pooler.dense.weight"], state["pooler.dense.bias"] = torch.zeros(hidden, hidden), torch.zeros(hidden)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = StructureDistance.from_pretrained(str(tmp_path))
    x = torch.rand(2, 3, 40, 40)
    assert torch.allclose(loaded.keys(x), ref.keys(x))
