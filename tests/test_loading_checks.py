"""A model whose files lack a weight is refused with one line naming the component and the fix, instead of
running on newly initialised (random) weights. The check reads the libraries' loading info, not their log
(the CLI hides transformers' warnings with TRANSFORMERS_VERBOSITY=error)."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from sdattn.errors import ModelLoadError
from sdattn.hub import declared_floor
from sdattn.models import load_pipeline
from tests.conftest import ROOT


def _drop_weight(file, name_part):
    """Rewrite a safetensors file without the first weight whose name contains ``name_part``; its name."""
    state = load_file(file)
    dropped = next(k for k in sorted(state) if name_part in k)
    del state[dropped]
    save_file(state, file, metadata={"format": "pt"})
    return dropped


@pytest.fixture(scope="module")
def saved_tiny(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("component,weights_file,name_part,library", [
    ("text_encoder", "model.safetensors", "final_layer_norm", "transformers"),
    ("unet", "diffusion_pytorch_model.safetensors", "conv_out", "diffusers"),
])
def test_folder_with_a_missing_weight_is_refused_with_one_line(
        saved_tiny, tmp_path, component, weights_file, name_part, library):
    folder = tmp_path / "pipe"
    shutil.copytree(saved_tiny, folder)
    dropped = _drop_weight(folder / component / weights_file, name_part)
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(path=str(folder))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{component} of model.path")
    assert dropped in msg and "would be random" in msg and "re-save" in msg
    assert f"upgrade {library} to {declared_floor(library)} (installed " in msg and declared_floor(library)[:2] == ">="


def test_folder_with_another_key_layout_is_refused(saved_tiny, tmp_path):
    """Every text-encoder weight under names the installed transformers does not know (what a folder saved
    by a transformers with another layout looks like to an older one): all missing, all unexpected."""
    folder = tmp_path / "pipe"
    shutil.copytree(saved_tiny, folder)
    file = folder / "text_encoder" / "model.safetensors"
    state = load_file(file)
    save_file({f"renamed.{k}": v for k, v in state.items()}, file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"^text_encoder of .*: (\d+) of \1 weights are not in its files.*"
                                             r"fit no parameter.*upgrade transformers"):
        load_pipeline(path=str(folder))


def test_complete_folder_loads(saved_tiny, tiny_pipe):
    pipe = load_pipeline(path=str(saved_tiny))
    assert all(t.equal(tiny_pipe.text_encoder.state_dict()[k]) for k, t in pipe.text_encoder.state_dict().items())


def test_clip_metric_model_with_a_missing_weight_is_refused(tmp_path):
    from evaluation.metrics import ClipMetrics

    folder = tmp_path / "clip"
    shutil.copytree(ROOT / "models" / "toy_clip", folder)
    dropped = _drop_weight(folder / "model.safetensors", "visual_projection")
    with pytest.raises(ModelLoadError, match="^CLIP model .*would be random.*upgrade transformers") as e:
        ClipMetrics.from_pretrained(str(folder))
    assert dropped in str(e.value) and "\n" not in str(e.value)


def test_dino_model_with_a_missing_weight_is_refused(tmp_path):
    from evaluation.structure import StructureDistance, tiny_dino

    tiny_dino().model.save_pretrained(tmp_path)
    _drop_weight(tmp_path / "model.safetensors", "layernorm")
    with pytest.raises(ModelLoadError, match="^DINO ViT model .*would be random"):
        StructureDistance.from_pretrained(str(tmp_path))
