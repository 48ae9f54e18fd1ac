"""Single-file (original Stable Diffusion layout) checkpoints, as users of fine-tunes have them: a tiny
SD-layout pipeline written as one ``.safetensors`` with the original key names, loaded back through
``model.path=<file> model.config=<diffusers folder>``, must equal the folder tensor for tensor and edit alike.

The key names follow diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` (the inverse of
what ``from_single_file`` converts), derived here from the model's config rather than SD 1.5's fixed counts."""

import re

import pytest
import torch
from safetensors.torch import save_file

from editing.fpe import fpe_generated
from sdattn.errors import ModelLoadError
from sdattn.models import load_pipeline

UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_norm_out": "norm_out"}
TEXT_PREFIX = "cond_stage_model.transformer.text_model."


def _rename_head(rest: str, names: dict[str, str]) -> str:
    """``rest`` with its leading module name replaced through ``names`` (longest match first)."""
    for old in sorted(names, key=len, reverse=True):
        if rest.startswith(old + "."):
            return names[old] + rest[len(old):]
    return rest


def unet_original_key(key: str, config) -> str:
    n = config.layers_per_block + 1  # original blocks per diffusers down block (resnets + downsampler / up block)
    up_has_attention = [t.startswith("CrossAttn") for t in config.up_block_types]
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if part == "resnets":
            rest = _rename_head(rest, UNET_RESNET)
        sub = 0 if part == "resnets" else 1
        if kind == "down_blocks":
            if part == "downsamplers":  # conv.weight → op.weight
                return f"input_blocks.{n * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{n * i + j + 1}.{sub}.{rest}"
        if part == "upsamplers":
            return f"output_blocks.{n * i + n - 1}.{2 if up_has_attention[i] else 1}.{rest}"
        return f"output_blocks.{n * i + j}.{sub}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        if m.group(1) == "attentions":
            return f"middle_block.1.{m.group(3)}"
        return f"middle_block.{2 * int(m.group(2))}.{_rename_head(m.group(3), UNET_RESNET)}"
    return _rename_head(key, UNET_TOP)


def vae_original_key(key: str, config) -> str:
    n_blocks = len(config.block_out_channels)
    m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)",
                 key)
    if m:
        coder, kind, i, part, j, rest = m.groups()
        i = int(i) if kind == "down_blocks" else n_blocks - 1 - int(i)  # original up blocks count upward
        block = "down" if kind == "down_blocks" else "up"
        if part == "resnets":
            return f"{coder}.{block}.{i}.block.{j}.{_rename_head(rest, VAE_RESNET)}"
        return f"{coder}.{block}.{i}.{'downsample' if part == 'downsamplers' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        coder, part, j, rest = m.groups()
        if part == "attentions":
            return f"{coder}.mid.attn_1.{_rename_head(rest, VAE_ATTENTION)}"
        return f"{coder}.mid.block_{int(j) + 1}.{_rename_head(rest, VAE_RESNET)}"
    m = re.match(r"(encoder|decoder)\.(.*)", key)
    return f"{m.group(1)}.{_rename_head(m.group(2), VAE_TOP)}" if m else key


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder under the original SD checkpoint's names."""
    state = {}
    for key, value in pipe.unet.state_dict().items():
        state["model.diffusion_model." + unet_original_key(key, pipe.unet.config)] = value
    for key, value in pipe.vae.state_dict().items():
        name = vae_original_key(key, pipe.vae.config)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention projections are 1×1 convolutions
        state["first_stage_model." + name] = value
    for key, value in pipe.text_encoder.state_dict().items():  # flattened (transformers ≥ 5.6) or not
        state[TEXT_PREFIX + key.removeprefix("text_model.")] = value
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def single_file(tiny_pipe, tmp_path_factory):
    """(checkpoint file, diffusers config folder) of the tiny pipeline."""
    root = tmp_path_factory.mktemp("single")
    tiny_pipe.save_pretrained(root / "folder")
    state = original_state_dict(tiny_pipe)
    assert TEXT_PREFIX + "embeddings.token_embedding.weight" in state
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in state  # how diffusers spots SD 1.x
    save_file(state, root / "tiny.safetensors")
    return root / "tiny.safetensors", root / "folder"


def test_single_file_loads_every_tensor_equal_to_the_folder(single_file, tiny_pipe):
    file, folder = single_file
    pipe = load_pipeline(path=str(file), config=str(folder))
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(tiny_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert got.keys() == want.keys(), name
        unequal = [k for k in want if not torch.equal(got[k], want[k])]
        assert not unequal, f"{name}: {unequal[:3]}"
    assert pipe.safety_checker is None and pipe.tokenizer.get_vocab() == tiny_pipe.tokenizer.get_vocab()


def test_single_file_through_the_cli_config_edits_like_the_folder(single_file, compose_cfg):
    from experiments.common import load_model

    file, folder = single_file
    from_file = load_model(compose_cfg("model=local", f"model.path={file}", f"model.config={folder}"))
    from_folder = load_model(compose_cfg("model=local", f"model.path={folder}"))
    kw = dict(seed=4, layers="all", self_replace_steps=0.5, num_inference_steps=3, progress=False)
    a = fpe_generated(from_file, "a white car", "a red car", **kw).latents
    b = fpe_generated(from_folder, "a white car", "a red car", **kw).latents
    assert torch.equal(a["edited"], b["edited"]) and torch.equal(a["source"], b["source"])


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache (huggingface_hub reads HF_HOME once, at import: patch what it read)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_single_file_without_config_names_the_hub_configs_it_needs(single_file, hub_cache):
    file, _ = single_file
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(path=str(file))
    msg = str(e.value)
    assert "\n" not in msg and "needs the diffusers configs of 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in msg
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "model.config=" in msg


def test_single_file_without_config_uses_the_cached_hub_configs(single_file, tiny_pipe, hub_cache):
    """What the error above asks for: the configs of the repo diffusers infers (here the tiny model's, put
    where `huggingface-cli download <repo> --include '*.json' '*.txt'` would) make model.config unnecessary."""
    file, folder = single_file
    snapshot = hub_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / ("0" * 40)
    for config_file in [*folder.rglob("*.json"), *folder.rglob("*.txt")]:
        target = snapshot / config_file.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(config_file.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    pipe = load_pipeline(path=str(file))
    assert all(torch.equal(t, tiny_pipe.unet.state_dict()[k]) for k, t in pipe.unet.state_dict().items())


def test_single_file_errors_name_only_their_cause(single_file, tiny_pipe, tmp_path):
    file, folder = single_file
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable checkpoint") as e:
        load_pipeline(path=str(tmp_path / "junk.safetensors"), config=str(folder))
    assert "config" not in str(e.value)
    state = original_state_dict(tiny_pipe)
    del state[TEXT_PREFIX + "final_layer_norm.weight"]
    save_file(state, tmp_path / "incomplete.safetensors")
    with pytest.raises(ModelLoadError, match=r"^text_encoder of model.path .*1 weights are not in the checkpoint "
                                             r"\(e.g. (text_model\.)?final_layer_norm.weight\)") as e:
        load_pipeline(path=str(tmp_path / "incomplete.safetensors"), config=str(folder))
    assert "needs the diffusers configs" not in str(e.value)
