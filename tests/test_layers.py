import pytest
import torch
from diffusers import UNet2DConditionModel

from sdattn.errors import UserError
from sdattn.layers import LayerSelector, enumerate_layers, parse_indices, select_layers

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
PAPER_RESOLUTIONS = [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]


@pytest.fixture(scope="module")
def sd15_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


def test_sd15_layer_table_matches_the_papers_convention(sd15_unet):
    layers = enumerate_layers(sd15_unet, (64, 64))
    for kind, attn in (("self", "attn1"), ("cross", "attn2")):
        mine = [x for x in layers if x.kind == kind]
        assert [x.index for x in mine] == list(range(1, 17))
        assert [x.resolution for x in mine] == PAPER_RESOLUTIONS
        assert all(x.name.endswith(f"{attn}.processor") for x in mine)
    assert [x.block for x in layers if x.kind == "self"][6] == "mid"
    # attn_processors lists mid last; run order puts it 7th
    assert list(sd15_unet.attn_processors).index(layers[6].name) > list(sd15_unet.attn_processors).index(
        layers[7].name)


def test_resolution_follows_configured_image_size(sd15_unet):
    layers = enumerate_layers(sd15_unet, (96, 64))  # 768×512 px
    assert [(x.height, x.width) for x in layers[:3]] == [(96, 64), (96, 64), (48, 32)]


def test_tiny_model_has_sd_numbering(tiny_pipe):
    layers = enumerate_layers(tiny_pipe.unet)
    assert len(layers) == 32 and {x.name for x in layers} == set(tiny_pipe.unet.attn_processors)
    assert [x.resolution for x in layers if x.kind == "cross"] == [r // 4 for r in PAPER_RESOLUTIONS]


@pytest.mark.parametrize("spec,expected", [
    ("4-14", list(range(4, 15))), ("3,6,9", [3, 6, 9]), ([3, "10-12"], [3, 10, 11, 12]), (7, [7]),
    ("all", list(range(1, 17))), (None, list(range(1, 17))),
])
def test_parse_indices(spec, expected):
    assert parse_indices(spec, 16) == expected


@pytest.mark.parametrize("spec,match", [("0-3", "out of range"), ("17", "1..16"), ("x", "not an index"),
                                        ("9-4", "empty")])
def test_parse_indices_errors(spec, match):
    with pytest.raises(UserError, match=match):
        parse_indices(spec, 16)


def test_selectors(sd15_unet):
    layers = enumerate_layers(sd15_unet, (64, 64))
    paper = LayerSelector(kinds="self", indices="4-14").select(layers)
    assert [x.index for x in paper] == list(range(4, 15)) and {x.kind for x in paper} == {"self"}
    official = LayerSelector(kinds="self", max_tokens=32 * 32).select(layers)
    assert [x.index for x in official] == list(range(3, 14))
    res = LayerSelector(kinds=["cross"], resolutions=[16]).select(layers)
    assert [x.index for x in res] == [5, 6, 8, 9, 10]
    named = LayerSelector(names=["mid_block.*"]).select(layers)
    assert [x.label for x in named] == ["self-7", "cross-7"]
    with pytest.raises(UserError, match="kind"):
        LayerSelector(kinds="both").select(layers)


def test_layer_presets_on_the_sd15_layout(sd15_unet):
    layers = enumerate_layers(sd15_unet, (64, 64))

    def indices(spec, kind="self", resolution=None):
        return [x.index for x in select_layers(layers, spec, kind, resolution)]

    assert indices("paper") == list(range(4, 15)) and indices("official") == list(range(3, 14))
    assert indices("stable") == list(range(5, 11)) and indices("decoder") == list(range(9, 17))  # PnP official
    assert indices("all", "cross", "1/4") == [5, 6, 8, 9, 10] == indices("all", "cross", 16)  # LocalBlend's
    assert indices("official", "cross", 32) == [3, 4, 11, 12, 13] and indices("1-4", "cross", "all") == [1, 2, 3, 4]
    assert indices("none") == indices(None) == indices([]) == []
    assert indices([2, "5-6"], "cross") == [2, 5, 6] and indices(7) == [7]


def test_layer_preset_errors(tiny_pipe):
    layers = enumerate_layers(tiny_pipe.unet)
    toy_sized = [x for x in layers if x.index <= 7]
    with pytest.raises(UserError, match="preset 'paper' .* needs ≥ 14 self layers; this model has 7"):
        select_layers(toy_sized, "paper")
    with pytest.raises(UserError, match="out of range: this model has layers 1..16"):
        select_layers(layers, "4-20")
    with pytest.raises(UserError, match="layer kind 'both'"):
        select_layers(layers, "all", "both")
    with pytest.raises(UserError, match="resolution '1/x' is not a grid side"):
        select_layers(layers, "all", "cross", "1/x")
