import pytest
import torch

from sdattn.errors import ModelLoadError
from sdattn.models import load_pipeline
from sdattn.sampling import sample
from sdattn.tokenizer import build_word_tokenizer


def test_tokenizer_words_are_single_tokens_and_round_trip(tmp_path):
    words = ["a", "an", "red", "green", "greenery", "standing", "car", "cart"]
    tok = build_word_tokenizer(words, 16)
    ids = tok("a green car standing", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[5] == tok.eos_token_id
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)
    tok.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("a green car").input_ids == tok("a green car").input_ids and again.model_max_length == 16


def test_saved_tiny_pipeline_loads_back_through_model_path(tiny_pipe, tmp_path, compose_cfg):
    from experiments.common import load_model

    tiny_pipe.save_pretrained(tmp_path / "tiny")
    cfg = compose_cfg("model=local", f"model.path={tmp_path / 'tiny'}")
    pipe = load_model(cfg)
    kw = dict(num_inference_steps=2, progress=False, decode_images=False)
    a = sample(tiny_pipe, ["a red car"], seeds=[0], **kw).latents
    b = sample(pipe, ["a red car"], seeds=[0], **kw).latents
    assert torch.allclose(a, b, atol=1e-6)
    # model.path also overrides the default (tiny) preset
    pipe2 = load_model(compose_cfg(f"model.path={tmp_path / 'tiny'}"))
    assert torch.equal(next(pipe2.unet.parameters()), next(pipe.unet.parameters()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(path="/no/such/dir"), "does not exist"),
    (dict(id="runwayml/stable-diffusion-v1-5", alt_ids=["stable-diffusion-v1-5/stable-diffusion-v1-5"]),
     "not available offline.*huggingface-cli download runwayml/stable-diffusion-v1-5.*model.path"),
    (dict(), "no model given"),
])
def test_missing_model_gives_one_clear_line(kwargs, match, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError, match=match) as e:
        load_pipeline(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_single_file_and_folder(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="suffix '.txt'"):
        load_pipeline(path=str(tmp_path / "x.txt"))
    with pytest.raises(ModelLoadError, match="without model_index.json"):
        load_pipeline(path=str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not load model.path"):
        load_pipeline(path=str(tmp_path / "w.safetensors"), config=str(tmp_path))


# SD 1.5's parameter counts (runwayml/stable-diffusion-v1-5: unet, vae, text_encoder)
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_sd15_shaped_has_sd15s_exact_shapes(compose_cfg):
    from experiments.common import load_model
    from sdattn.layers import enumerate_layers

    pipe = load_model(compose_cfg("model=sd15_shaped", "device=meta", "dtype=float16"))  # shapes only, no memory
    for part, count in SD15_PARAMS.items():
        params = list(getattr(pipe, part).parameters())
        assert sum(p.numel() for p in params) == count, part
        assert {(p.device.type, p.dtype) for p in params} == {("meta", torch.float16)}
    unet, text = pipe.unet, pipe.text_encoder.config
    assert unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2").to_k.weight.shape == (320, 768)
    assert (text.hidden_size, text.num_attention_heads, text.intermediate_size, text.num_hidden_layers) == (
        768, 12, 3072, 12)
    assert pipe.vae.config.layers_per_block == 2 and pipe.vae.config.block_out_channels == (128, 256, 512, 512)
    layers = enumerate_layers(unet)
    assert len(layers) == 32 and max(x.tokens for x in layers) == 64 * 64  # 512 px: 64² latents


def test_tiny_builds_in_the_requested_dtype_with_the_float32_weights_cast(compose_cfg):
    from experiments.common import load_model

    full = load_model(compose_cfg("model=tiny"))
    half = load_model(compose_cfg("model=tiny", "dtype=bfloat16"))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(full, part).state_dict(), getattr(half, part).state_dict()
        assert all(b[k].dtype == (torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in a.items())
        assert all(torch.equal(v.to(b[k].dtype), b[k]) for k, v in a.items())
    kw = dict(num_inference_steps=2, progress=False, decode_images=False)
    z = sample(half, ["a red car"], seeds=[0], **kw).latents
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
