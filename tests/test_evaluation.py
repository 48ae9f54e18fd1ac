"""Benchmarks (official FPE files, PnP TI2I, PIE-Bench) and metrics (CLIP score, directional sim., PSNR, SSIM)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.datasets import (
    DATASET_NAMES,
    FPE_CAR_COLORS,
    car_fake_edit_pairs,
    decode_rle_mask,
    example_mask,
    load_dataset,
    load_fpe,
)
from evaluation.metrics import (
    ClipMetrics,
    clip_score_from_features,
    directional_similarity_from_features,
    preprocess_images,
    psnr,
    ssim,
)
from sdattn.errors import UserError

from .conftest import ROOT, SHARED

FPE = SHARED / "benchmarks" / "fpe"
OFFICIAL = {"car_fake_edit": ("Car_fake_edit.json", 756), "imagenet_fake_edit": ("ImageNet_fake_edit.json", 1182),
            "car_real_edit": ("Car_real_edit.json", 4058), "imagenet_real_edit": ("ImageNet_real_edit.json", 1092)}
needs_fpe = pytest.mark.skipif(not FPE.is_dir(), reason="shared/benchmarks/fpe not beside the checkout")


# ------------------------------------------------------------------------------------ datasets

@needs_fpe
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_fpe_counts(name, tmp_path):
    file, count = OFFICIAL[name]
    root = str(tmp_path) if name.endswith("real_edit") else None
    ds = load_dataset(name, root=root, limit=None, path=str(FPE / file))
    assert len(ds.examples) == count
    assert all(ex.source_prompt and ex.target_prompt for ex in ds.examples)
    assert len({ex.id for ex in ds.examples}) == count
    if root is None:
        assert ds.missing_images == [] and all(ex.image_path is None for ex in ds.examples)
    else:  # no images under tmp_path: all kept, all reported
        assert ds.missing_examples == count and ds.available() == []
        assert len(ds.missing_images) == len({ex.extra["image_name"] for ex in ds.examples})
        assert f"{count} skipped" in ds.summary()
    assert len(load_dataset(name, root=root, limit=5, path=str(FPE / file)).examples) == 5


@needs_fpe
def test_car_real_example_and_present_image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "002657.jpg")
    ds = load_dataset("car_real_edit", root=str(tmp_path), limit=None, path=str(FPE / "Car_real_edit.json"))
    first = ds.examples[0]
    assert (first.source_prompt, first.target_prompt) == ("a white car", "a red car")
    assert first.image_path == str(tmp_path / "002657.jpg")
    assert first.image_path not in ds.missing_images
    assert 0 < len(ds.available()) < len(ds.examples)
    assert len(ds.available()) + ds.missing_examples == len(ds.examples)


def test_fpe_both_key_spellings_and_target_lists(tmp_path):
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps([{"soure_prompt": "a red car", "edit_prompt": "a blue car"},
                             {"source_prompt": "a cat", "edit_prompt": "a dog"},
                             {"source_prompt": "a cat", "edit_prompt": ["a fox", "a owl"]}]))
    ds = load_fpe(p, name="mine")
    assert [(e.source_prompt, e.target_prompt) for e in ds.examples] == [
        ("a red car", "a blue car"), ("a cat", "a dog"), ("a cat", "a fox"), ("a cat", "a owl")]
    p.write_text(json.dumps([{"prompt": "a cat", "edit_prompt": "a dog"}]))
    with pytest.raises(UserError, match="soure_prompt"):
        load_fpe(p)


def test_real_dataset_needs_root_and_fpe_needs_path(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"image_name": "a.jpg", "soure_prompt": "a", "edit_prompt": "b"}]))
    with pytest.raises(UserError, match="data.root"):
        load_dataset("car_real_edit", root=None, limit=None, path=str(p))
    with pytest.raises(UserError, match="data.path"):
        load_dataset("car_fake_edit", root=None, limit=None)
    with pytest.raises(UserError, match="data.path"):
        load_dataset("car_fake_edit", root=None, limit=None, path=str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="data.limit"):
        load_dataset("car_real_edit", root=str(tmp_path), limit=-1, path=str(p))


def test_unknown_dataset_name():
    with pytest.raises(UserError, match="'nonsense'.*car_fake_edit.*pie_bench") as e:
        load_dataset("nonsense", root=None, limit=None)
    assert "\n" not in str(e.value)
    from toyworld.edit_benchmark import TOY_DATASETS

    assert set(DATASET_NAMES) | set(TOY_DATASETS) == {p.stem for p in (ROOT / "configs" / "data").glob("*.yaml")}


def test_pnp_ti2i_yaml(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "horse.png")
    y = tmp_path / "pnp.yaml"
    y.write_text("init_img: imgs/horse.png\nsource_prompt: a photo of a horse\nseed: 7\nscale: 7.5\n"
                 "ddim_steps: 50\ntarget_prompts:\n  - a photo of a zebra\n  - a photo of a robot horse\n")
    ds = load_dataset("pnp_ti2i", root=None, limit=None, path=str(y))
    assert [e.target_prompt for e in ds.examples] == ["a photo of a zebra", "a photo of a robot horse"]
    assert all(e.source_prompt == "a photo of a horse" and e.seed == 7 for e in ds.examples)
    assert ds.examples[0].image_path == str(tmp_path / "imgs" / "horse.png")
    assert ds.examples[0].extra["scale"] == 7.5 and ds.examples[0].extra["ddim_steps"] == 50
    assert ds.missing_images == []
    # no source prompt, missing image, a list of entries, root given as the yaml
    y.write_text("- init_img: gone.png\n  target_prompts: [a dog]\n- init_img: imgs/horse.png\n"
                 "  target_prompts: [a cat, a fox]\n")
    ds = load_dataset("pnp_ti2i", root=str(y), limit=2)
    assert len(ds.examples) == 2 and ds.examples[0].source_prompt == "" and ds.examples[0].seed is None
    assert ds.missing_images == [str(tmp_path / "gone.png")] and ds.missing_examples == 1
    y.write_text("target_prompts: [a dog]\n")
    with pytest.raises(UserError, match="init_img"):
        load_dataset("pnp_ti2i", root=None, limit=None, path=str(y))


def _rle_of(mask: np.ndarray) -> list[int]:
    flat = mask.ravel().astype(np.int8)
    d = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return [int(v) for s, e in zip(starts, ends) for v in (s, e - s)]


def test_rle_mask_pixel_exact():
    truth = np.zeros((512, 512), dtype=bool)
    truth[100:140, 200:260] = True        # a box: 40 runs of 60
    truth[511, 500:] = True               # run ending at the last pixel
    truth[300, 511] = truth[301, 0] = True  # run wrapping a row end
    rle = _rle_of(truth)
    assert rle[:2] == [100 * 512 + 200, 60]
    got = decode_rle_mask(rle)
    assert got.dtype == bool and got.shape == (512, 512)
    assert np.array_equal(got, truth)
    assert np.array_equal(decode_rle_mask([512 * 512 - 2, 10]), np.eye(1, 512 * 512, 512 * 512 - 2, dtype=bool)
                          .reshape(512, 512) | np.eye(1, 512 * 512, 512 * 512 - 1, dtype=bool).reshape(512, 512))
    border = decode_rle_mask([], official_border=True)
    assert border[0].all() and border[:, -1].all() and not border[1:-1, 1:-1].any()
    with pytest.raises(UserError, match="even"):
        decode_rle_mask([1, 2, 3])


def test_pie_bench(tmp_path):
    (tmp_path / "annotation_images" / "0_random_140").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "annotation_images" / "0_random_140" / "000000000000.jpg")
    truth = np.zeros((512, 512), dtype=bool)
    truth[10:20, 30:35] = True
    mapping = {
        "000000000000": {"image_path": "0_random_140/000000000000.jpg",
                         "original_prompt": "a [white] cat sitting on a bench",
                         "editing_prompt": "a [black] [dog] sitting on a bench",
                         "editing_instruction": "Make the cat a black dog", "editing_type_id": "0",
                         "blended_word": "cat dog", "mask": _rle_of(truth)},
        "000000000001": {"image_path": "0_random_140/000000000001.jpg", "original_prompt": "a house",
                         "editing_prompt": "a [wooden] house", "editing_type_id": "7", "mask": []},
    }
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    ds = load_dataset("pie_bench", root=str(tmp_path), limit=None)
    a, b = ds.examples
    assert (a.source_prompt, a.target_prompt) == ("a white cat sitting on a bench", "a black dog sitting on a bench")
    assert a.extra["edited_words"] == ["black", "dog"] and a.extra["source_words"] == ["white"]
    assert a.extra["editing_type_id"] == "0" and a.extra["editing_prompt_raw"].startswith("a [black]")
    assert a.image_path == str(tmp_path / "annotation_images" / "0_random_140" / "000000000000.jpg")
    assert np.array_equal(example_mask(a), truth)
    assert np.array_equal(a.extra["object_mask"](), truth)  # Shape-Guided's object mask, decoded on demand
    assert not example_mask(b).any()
    assert ds.missing_images == [b.image_path] and len(ds.available()) == 1
    with pytest.raises(UserError, match="data.root"):
        load_dataset("pie_bench", root=None, limit=None)


@needs_fpe
def test_generator_rebuilds_official_car_fake_edit():
    official = load_dataset("car_fake_edit", root=None, limit=None, path=str(FPE / "Car_fake_edit.json"))
    rebuilt = car_fake_edit_pairs(FPE_CAR_COLORS)
    assert [(e.source_prompt, e.target_prompt) for e in rebuilt] == \
           [(e.source_prompt, e.target_prompt) for e in official.examples]


def test_generator_small():
    pairs = car_fake_edit_pairs(["red", "blue", "gold"])
    assert len(pairs) == 6 and pairs[0].source_prompt == "a red car" and pairs[0].target_prompt == "a blue car"
    assert all(p.source_prompt != p.target_prompt for p in pairs)
    with pytest.raises(UserError, match="distinct"):
        car_fake_edit_pairs(["red", "red"])


def test_data_configs_compose(compose_cfg):
    from omegaconf import OmegaConf

    for option in sorted(p.stem for p in (ROOT / "configs" / "data").glob("*.yaml")):
        cfg = compose_cfg(f"data={option}")
        data = OmegaConf.to_container(cfg, resolve=True)["data"]
        if option.startswith("toy_"):  # generated: rendered sources go to the cache, 12 pairs per kind
            assert data["root"].endswith("toy_edit") and data["pairs_per_kind"] == 12 and data["limit"] is None
        else:
            assert data == {"name": option, "_target_": "evaluation.datasets.load_dataset", "path": None,
                            "root": None, "limit": None}


# ------------------------------------------------------------------------------------- metrics

WORDS = ["a", "photo", "of", "red", "blue", "car", "cat", "dog"]


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPConfig, CLIPModel

    from sdattn.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, model_max_length=16)
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id}
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16, **ids),
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    torch.manual_seed(0)
    return ClipMetrics(CLIPModel(cfg), tok)


def _images(n, h=40, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_preprocess_matches_manual():
    x = _images(2, 40, 48)
    got = preprocess_images(x, 32)
    ref = torch.nn.functional.interpolate(x, size=(32, 38), mode="bicubic", antialias=True)[..., :, 3:35]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, (ref.clamp(0, 1) - mean) / std)
    with pytest.raises(UserError, match="B, 3, H, W"):
        preprocess_images(torch.rand(3, 8, 8), 32)


def test_clip_score_formula(clip):
    imgs, prompts = _images(3), ["a red car", "a photo of a cat", "a blue dog"]
    img_f, txt_f = clip.image_features(imgs), clip.text_features(prompts)
    assert img_f.shape == (3, 16) and txt_f.shape == (3, 16)
    # direct: the model's own projection path
    m = clip.model
    with torch.no_grad():
        direct_img = m.visual_projection(m.vision_model(pixel_values=preprocess_images(imgs, 32)).pooler_output)
    torch.testing.assert_close(img_f, direct_img)
    score = clip.clip_score(imgs, prompts)
    cos = (img_f / img_f.norm(dim=-1, keepdim=True) * (txt_f / txt_f.norm(dim=-1, keepdim=True))).sum(-1)
    torch.testing.assert_close(score, 100 * cos.clamp(min=0))
    assert score.shape == (3,) and ((score >= 0) & (score <= 100)).all()
    # text features do not depend on padding (batch with longer prompts)
    torch.testing.assert_close(clip.text_features(["a red car"])[0], txt_f[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="3 images and 2 prompts"):
        clip.clip_score(imgs, prompts[:2])


def test_clip_score_against_torchmetrics(clip):
    """torchmetrics' clip_score with a model adapter (features as tensors) + our preprocessing."""
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    class Model(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, pixel_values):
            return self.m.visual_projection(self.m.vision_model(pixel_values=pixel_values).pooler_output)

        def get_text_features(self, input_ids, attention_mask):
            return self.m.text_projection(self.m.text_model(input_ids=input_ids,
                                                            attention_mask=attention_mask).pooler_output)

    def processor(images=None, text=None, **_):
        if images is not None:
            return {"pixel_values": preprocess_images(torch.stack(images), 32)}
        return clip.tokenizer(text, padding=True, return_tensors="pt")

    imgs, prompts = _images(4, seed=3), ["a red car", "a cat", "a photo of a dog", "blue"]
    ours = clip.clip_score(imgs, prompts)
    assert (ours > 0).sum() >= 2  # not a vacuous 0 == 0 comparison
    with torch.no_grad():
        for i in range(4):
            ref = tm_clip_score(imgs[i:i + 1], prompts[i], model_name_or_path=lambda: (Model(clip.model), processor))
            torch.testing.assert_close(ours[i], ref.float().reshape(()), atol=1e-4, rtol=1e-4)


def test_directional_similarity(clip):
    g = torch.Generator().manual_seed(1)
    si, st = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    d = torch.randn(4, 16, generator=g)
    # Δtext parallel to Δimage (no normalisation): exactly 1; anti-parallel: -1
    one = directional_similarity_from_features(si, si + d, st, st + 2.5 * d, normalize=False)
    torch.testing.assert_close(one, torch.ones(4))
    torch.testing.assert_close(directional_similarity_from_features(si, si - d, st, st + d, normalize=False),
                               -torch.ones(4))
    # with normalisation: same directions after normalising
    u = torch.nn.functional.normalize
    ei, tt = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    direct = torch.nn.functional.cosine_similarity(u(ei, dim=-1) - u(si, dim=-1), u(tt, dim=-1) - u(st, dim=-1))
    torch.testing.assert_close(directional_similarity_from_features(si, ei, st, tt), direct)
    # no change in the image → 0, not NaN
    assert directional_similarity_from_features(si, si, st, tt).abs().max() == 0
    # through the model: equals the formula on the model's features, in [-1, 1]
    src, edit = _images(2, seed=4), _images(2, seed=5)
    sp, tp = ["a red car", "a cat"], ["a blue car", "a dog"]
    got = clip.directional_similarity(src, edit, sp, tp)
    ref = directional_similarity_from_features(clip.image_features(src), clip.image_features(edit),
                                               clip.text_features(sp), clip.text_features(tp))
    torch.testing.assert_close(got, ref)
    assert got.shape == (2,) and (got.abs() <= 1 + 1e-6).all()
    assert clip_score_from_features(-si, si).eq(0).all()


def test_clip_from_pretrained_offline_error(tmp_path):
    with pytest.raises(UserError, match="openai/clip-vit-large-patch14.*huggingface-cli download") as e:
        ClipMetrics.from_pretrained("openai/clip-vit-large-patch14-not-cached")
    with pytest.raises(UserError, match="local folder"):
        ClipMetrics.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value)


def test_psnr_ssim():
    x = _images(2, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert torch.isinf(psnr(x, x)).all() or (psnr(x, x) > 100).all()
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    p = psnr(y, x)
    mse = ((y - x) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(p, 10 * torch.log10(1 / mse), atol=1e-3, rtol=1e-4)
    s = ssim(y, x)
    assert s.shape == (2,) and (s < 1).all() and (s > 0).all()
    assert (ssim((x + 0.3 * torch.randn_like(x)).clamp(0, 1), x) < s).all()


def test_pair_scores_equal_the_two_metrics(clip):
    g = torch.Generator().manual_seed(3)
    src, edited = torch.rand(2, 3, 40, 40, generator=g), torch.rand(2, 3, 40, 40, generator=g)
    sp, tp = ["a red car", "a photo of a dog"], ["a blue car", "a photo of a cat"]
    score, directional = clip.pair_scores(src, edited, sp, tp)
    assert torch.allclose(score, clip.clip_score(edited, tp))
    assert torch.allclose(directional, clip.directional_similarity(src, edited, sp, tp))
    with pytest.raises(UserError, match="pair_scores needs equal counts"):
        clip.pair_scores(src, edited[:1], sp, tp)
