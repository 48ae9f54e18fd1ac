"""Toy world: renderer, grammar, shipped model, training loop, evaluator's checker."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from toyworld.evaluate import classify_image, sample_images, validate_checker  # noqa: E402
from toyworld.world import REPO_ROOT, load_world  # noqa: E402

MODEL = REPO_ROOT / "models" / "toy"


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


# --------------------------------------------------------------------------- renderer / grammar
def test_render_is_deterministic(world):
    a, b = world.render_random(seed=7), world.render_random(seed=7)
    assert np.array_equal(a.image, b.image) and a.prompt == b.prompt and np.array_equal(a.mask, b.mask)
    c = world.render_random(seed=8)
    assert not np.array_equal(a.image, c.image)


def test_ground_truth_matches_pixels(world):
    rng = np.random.default_rng(0)
    for _ in range(30):
        r = world.render_random(rng=rng)
        assert r.image.shape == (world.image_size, world.image_size, 3) and r.image.dtype == np.uint8
        assert r.mask.dtype == bool and 0 < r.mask.sum() < r.mask.size
        fg = r.image[r.mask].astype(float).mean(0)
        ring = ndimage.binary_dilation(r.mask, iterations=world.outline_width + 2)  # object + outline
        bg = r.image[~ring].astype(float).mean(0)
        assert np.abs(fg - world.colors[r.color]).max() < 20
        assert np.abs(bg - world.backgrounds[r.background]["rgb"]).max() < 20
        words = r.prompt.split()
        assert words[1] == r.color and words[2] == r.shape
        assert words[0] == ("an" if r.color[0] in "aeiou" else "a")
        phrase = world.backgrounds[r.background]["phrase"]
        assert r.prompt.endswith(phrase) if phrase else len(words) == 3
        # the object stays inside the image (the checker reads the background from the border)
        assert not r.mask[[0, -1], :].any() and not r.mask[:, [0, -1]].any()


def test_grammar_from_yaml(world):
    assert len(world.colors) >= 8 and len(world.shapes) >= 6
    for c in ["red", "green", "blue", "yellow", "orange", "purple", "white", "pink"]:
        assert c in world.colors
    for s in ["circle", "square", "triangle", "diamond", "star", "cross", "car"]:
        assert s in world.shapes
    assert world.make_prompt("orange", "star", "park") == "an orange star in the park"
    assert world.make_prompt("red", "car", "street") == "a red car on the street"
    assert world.make_prompt("blue", "circle") == "a blue circle"
    assert world.parse_prompt("a white car on the street") == {"color": "white", "shape": "car",
                                                               "background": "street"}


def test_unknown_word_lists_vocabulary(world):
    with pytest.raises(ValueError) as e:
        load_world().check_prompt("a red dog")
    msg = str(e.value)
    assert "dog" in msg and all(w in msg for w in world.vocabulary())
    assert load_world().check_prompt("An orange star in the park") == ["an", "orange", "star", "in", "the", "park"]


# --------------------------------------------------------------------------- evaluator's checker
def test_checker_is_exact_on_renders(world):
    m = validate_checker(n=140, seed=3, world=world)
    assert m["color_accuracy"] >= 0.99 and m["shape_accuracy"] >= 0.99 and m["mask_iou"] > 0.95


def test_outline_is_outside_the_object_and_the_checker_reads_both_worlds(world):
    """The outline ring (style:) is drawn around the object, never on it: the mask and the colour stay
    the object's; the checker is exact on worlds with and without outlines."""
    import dataclasses

    outlined = dataclasses.replace(world, style={**world.style, "outline_width": 3})
    plain = dataclasses.replace(world, style={**world.style, "outline_width": 0})
    a = outlined.render("red", "car", "park", seed=4, x0=14, y0=14, size=30)
    b = plain.render("red", "car", "park", seed=4, x0=14, y0=14, size=30)
    inside = ndimage.binary_erosion(a.mask)  # edge pixels blend with the ring (anti-aliasing)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.image[inside], b.image[inside])
    ring = ndimage.binary_dilation(a.mask, iterations=2) & ~ndimage.binary_dilation(a.mask, iterations=1)
    assert np.abs(a.image[ring].astype(float).mean(0) - outlined.outline_rgb("park")).max() < 20
    assert np.abs(b.image[ring].astype(float).mean(0) - plain.backgrounds["park"]["rgb"]).max() < 20
    for w in (outlined, plain):
        m = validate_checker(n=70, seed=5, world=w)
        assert m["color_accuracy"] >= 0.99 and m["shape_accuracy"] >= 0.99 and m["mask_iou"] > 0.95


def test_varied_world_adds_texture_and_background_tints_but_keeps_layout_and_colour(world):
    """datasets/toy_world_varied.yaml: the same prompts, placements and masks as the plain world for a seed; the
    object gets a stripe texture (its pixels spread, its mean colour stays near its own) and the background a
    per-image tint (two seeds on one background differ)."""
    varied = load_world(REPO_ROOT / "datasets" / "toy_world_varied.yaml")
    assert varied.texture > 0 and varied.background_jitter > 0 and world.texture == world.background_jitter == 0
    assert varied.vocabulary() == world.vocabulary()
    # it extends the plain grammar: every other setting, nested style keys included, is the plain world's
    assert varied.colors == world.colors and varied.backgrounds == world.backgrounds
    assert {k: v for k, v in varied.style.items() if k not in ("texture", "background_jitter")} == world.style
    a, b = world.render("red", "square", "none", seed=3), varied.render("red", "square", "none", seed=3)
    assert a.prompt == b.prompt and np.array_equal(a.mask, b.mask)
    inner = ndimage.binary_erosion(a.mask, iterations=2)  # away from the anti-aliased edge and the ring
    obj, plain_obj = b.image[inner].astype(float), a.image[inner].astype(float)
    assert obj[:, 0].std() > 3 * plain_obj[:, 0].std()  # the texture varies the object's brightness
    assert np.abs(obj.mean(0) - plain_obj.mean(0)).max() < 25  # around its own colour
    other = varied.render("red", "square", "none", seed=4)
    assert np.abs(b.image[~b.mask].mean(0) - other.image[~other.mask].mean(0)).max() > 2  # its own tint


def test_outline_colour_default_is_read_from_the_grammar_only(tmp_path):
    """The outline colour comes from the YAML (style: or the background); a world drawing outlines with
    none is an error when loaded, naming the key; a flat world needs none."""
    import yaml

    from sdattn.errors import UserError

    grammar = yaml.safe_load((REPO_ROOT / "datasets" / "toy_world.yaml").read_text())
    del grammar["style"]["outline_rgb"], grammar["backgrounds"]["none"]["outline_rgb"]
    (tmp_path / "no_colour.yaml").write_text(yaml.safe_dump(grammar))
    with pytest.raises(UserError, match=r"style\.outline_rgb is not set and background 'none' has no outline_rgb"):
        load_world(tmp_path / "no_colour.yaml")
    grammar["style"]["outline_width"] = 0
    (tmp_path / "flat.yaml").write_text(yaml.safe_dump(grammar))
    flat = load_world(tmp_path / "flat.yaml")
    r = flat.render("red", "car", "none", seed=4, x0=14, y0=14, size=30)
    assert flat.outline_width == 0 and r.mask.any()
    grammar["style"]["outline_width"], grammar["style"]["outline_rgb"] = 3, [1, 2, 3]
    (tmp_path / "style_colour.yaml").write_text(yaml.safe_dump(grammar))
    outlined = load_world(tmp_path / "style_colour.yaml")
    assert outlined.outline_rgb("none") == (1, 2, 3) and outlined.outline_rgb("park") == (240, 240, 240)


def test_outline_makes_colour_templates_correlate(world):
    """The diagnosis behind the outline (toyworld.diagnose): with the shipped VAE, the latent object
    templates of two colours at one place correlate more with an outline than without."""
    import dataclasses

    from diffusers import AutoencoderKL

    from toyworld.diagnose import template_correlation

    vae = AutoencoderKL.from_pretrained(str(MODEL / "vae"), local_files_only=True).eval()
    cars = dataclasses.replace(world, shapes=["car"])
    with_ring = template_correlation(dataclasses.replace(cars, style={**world.style, "outline_width": 3}), vae)
    without = template_correlation(dataclasses.replace(cars, style={**world.style, "outline_width": 0}), vae)
    for bg in world.backgrounds:
        assert with_ring[bg]["car_mean"] > without[bg]["car_mean"] + 0.2, (bg, with_ring[bg], without[bg])
        assert with_ring[bg]["car_min"] > without[bg]["car_min"]


def test_classify_image_input_forms(world):
    r = world.render("purple", "star", "park", seed=1)
    t = torch.from_numpy(r.image).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    for img in (r.image, t, t * 2 - 1):
        c, s, m = classify_image(img, world)
        assert (c, s) == ("purple", "star") and m.shape == r.mask.shape


def test_checker_reads_a_white_object_whose_ring_has_a_gap(world):
    """Generated rings can be open (the README example's white car, seeds 0, 4, 5, 8 on the shipped model):
    the white interior then joins the light ground and the foreground is the ring alone. The checker closes
    the ring and reads the object; before, it read a black (ring) object with an empty or wrong mask."""
    r = world.render("white", "car", "none", seed=2, x0=16, y0=18, size=30)
    ring = ndimage.binary_dilation(r.mask, iterations=world.outline_width) & ~r.mask
    ys, xs = np.nonzero(ring)
    gap = ring & (np.abs(np.arange(64)[None, :] - xs[ys.argmax()]) <= 2)  # a 5-px cut through the bottom of the ring
    gap[: ys.max() - world.outline_width] = False
    image = r.image.copy()
    image[gap] = r.image[0, 0]  # the ground's colour
    assert gap.sum() >= 5
    c, s, m = classify_image(image, world)
    assert (c, s) == ("white", "car")
    assert (m & r.mask).sum() / (m | r.mask).sum() > 0.85


def test_checker_finds_nothing_on_blank(world):
    blank = np.full((64, 64, 3), 200, np.uint8)
    c, s, m = classify_image(blank, world)
    assert c is None and s is None


# --------------------------------------------------------------------------- shipped model
def test_shipped_model_layout(world):
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not list(MODEL.rglob("*.bin")) and list(MODEL.rglob("*.safetensors"))
    meta = json.loads((MODEL / "toy_model.json").read_text())
    assert meta["image_size"] == world.image_size and meta["guidance_scale"] > 1


def test_shipped_model_loads_offline(pipe, world):
    from diffusers import DDIMScheduler

    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == world.image_size
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe.tokenizer.model_max_length == 16
    for w in world.vocabulary():  # every vocabulary word is one token
        assert len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1
    names = [n for n, _ in pipe.unet.attn_processors.items()]
    assert sum(".attn1." in n for n in names) >= 3 and sum(".attn2." in n for n in names) >= 3
    out = pipe("a red circle", num_inference_steps=4, guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, world.image_size, world.image_size, 3)


def test_red_prompts_give_red_objects(pipe, world):
    """A loose smoke check: a random (untrained) model fails it."""
    shapes = ["circle", "square", "star", "car"]
    imgs = sample_images(pipe, [f"a red {s}" for s in shapes], seeds=[0, 1, 2, 3], num_inference_steps=25,
                         guidance_scale=2.0)
    red = np.array(world.colors["red"], float)
    hits = 0
    for im in imgs:
        c, _, m = classify_image(im, world)
        if m.sum() >= 20 and np.linalg.norm(im[m].astype(float).mean(0) - red) < 90:
            hits += 1
    assert hits >= 3


# --------------------------------------------------------------------------- training loop
def test_training_runs_both_stages(tmp_path):
    from diffusers import StableDiffusionPipeline
    from lightning.pytorch.loggers import CSVLogger

    from toyworld.train import train

    cfg = {"output_dir": str(tmp_path / "model"), "work_dir": str(tmp_path / "work"),
           "budget_minutes": 2, "export_every_minutes": 0,
           "vae": {"channels": [16, 16, 16], "batch": 4, "steps": 2, "scale_batches": 1},
           "unet": {"channels": [32, 32, 32], "batch": 4, "steps": 2, "warmup": 1}}
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "experiment" / "train_toy.yaml")
    summary = train(OmegaConf.merge(yaml.toy, cfg), make_logger=lambda stage, d: CSVLogger(str(d), name=f"toy-{stage}"))
    assert summary["vae_steps"] == 2 and summary["unet_steps"] == 2
    p = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    assert p.unet.config.sample_size * p.vae_scale_factor == 64
    assert abs(p.vae.config.scaling_factor - summary["scaling_factor"]) < 1e-6
    assert Path(tmp_path / "work" / "checkpoints").exists()
    assert (tmp_path / "work" / "toy-vae").is_dir() and (tmp_path / "work" / "toy-unet").is_dir()  # injected logger
    # the export runs with the toy model's settings wherever it is loaded from
    assert (tmp_path / "model" / "sdattn.yaml").read_text() == (MODEL / "sdattn.yaml").read_text()


def test_stage2_continues_with_a_frozen_text_encoder_and_a_longer_context(tmp_path):
    """toy.text.freeze / toy.text.max_length: the UNet trains, the text encoder stays as it was (positions of
    the old context encode exactly as before), the exported tokenizer pads to the new length."""
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    from toyworld.model import load_pipeline
    from toyworld.train import train

    yaml = OmegaConf.load(REPO_ROOT / "configs" / "experiment" / "train_toy.yaml").toy
    small = {"budget_minutes": 2, "export_every_minutes": 0,
             "vae": {"channels": [16, 16, 16], "batch": 4, "steps": 1, "scale_batches": 1},
             "unet": {"channels": [32, 32, 32], "batch": 4, "steps": 2, "warmup": 1}}
    logger = lambda stage, d: CSVLogger(str(d), name=f"toy-{stage}")  # noqa: E731
    train(OmegaConf.merge(yaml, small, {"output_dir": str(tmp_path / "a"), "work_dir": str(tmp_path / "wa")}), logger)
    frozen = "attn2.to_q"  # toy.unet.freeze; the sink loss runs beside it (toy.unet.sink_weight)
    train(OmegaConf.merge(yaml, small, {"output_dir": str(tmp_path / "b"), "work_dir": str(tmp_path / "wb"),
                                        "init_pipeline": str(tmp_path / "a"), "progress_every": 1,
                                        "text": {"freeze": True, "max_length": 20},
                                        "unet": {"freeze": [frozen], "sink_weight": 1.0, "padding_dropout": 0.5,
                                                 "padding_source": "other"}}),
          logger)
    a, b = load_pipeline(tmp_path / "a"), load_pipeline(tmp_path / "b")
    assert a.tokenizer.model_max_length == 16 and b.tokenizer.model_max_length == 20
    ids = a.tokenizer(["a red car"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    longer = b.tokenizer(["a red car"], padding="max_length", max_length=20, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(a.text_encoder(ids)[0], b.text_encoder(longer)[0][:, :16])
    moved = {n: not torch.equal(p, q) for (n, p), q in zip(a.unet.named_parameters(), b.unet.parameters())}
    assert any(moved.values())
    assert not any(m for n, m in moved.items() if frozen in n) and any(frozen in n for n in moved)
    metrics = pd.read_csv(next((tmp_path / "wb").rglob("metrics.csv")))
    assert metrics["unet/sink_deviation"].notna().any()
    # the continued export names the run it came from: its settings and steps, then its own in "config"
    meta_a, meta_b = (json.loads((tmp_path / x / "toy_model.json").read_text()) for x in ("a", "b"))
    assert [run["config"] for run in meta_b["lineage"]] == [meta_a["config"]]
    assert meta_b["lineage"][0]["unet_steps"] == meta_a["unet_steps"] == meta_b["init_unet_steps"]
    assert meta_b["config"]["init_pipeline"] == str(tmp_path / "a") and "previous_config" not in meta_b


def test_training_lineage_keeps_every_run_oldest_first():
    """toy_model.json's lineage grows by one run per continuation; a file from before lineages (the shipped
    model's: one ``previous_config``) gives that run first, then its own."""
    from toyworld.train import training_lineage

    shipped = json.loads((MODEL / "toy_model.json").read_text())
    runs = training_lineage(shipped)
    assert [r["config"] for r in runs] == [shipped["previous_config"], shipped["config"]]
    assert [r["unet_steps"] for r in runs] == [shipped["init_unet_steps"], shipped["unet_steps"]]
    child = {"lineage": runs, "config": {"output_dir": "c"}, "unet_steps": 7, "train_minutes": 1.5}
    assert training_lineage(child) == runs + [{"config": {"output_dir": "c"}, "unet_steps": 7, "train_minutes": 1.5}]
    assert training_lineage({}) == [] and training_lineage({"lineage": runs}) == runs


def test_stage2_from_scratch_builds_a_fresh_unet_of_the_configured_sizes(pipe):
    """toy.unet.from_scratch: a continued stage 2 keeps the init pipeline's VAE but trains a new UNet (same
    architecture, new weights); without it the pipeline's own UNet continues."""
    from omegaconf import OmegaConf

    from toyworld.train import stage2_unet

    ucfg = OmegaConf.load(REPO_ROOT / "configs" / "experiment" / "train_toy.yaml").toy.unet
    latent = pipe.unet.config.sample_size
    assert stage2_unet(ucfg, pipe, latent) is pipe.unet
    fresh = stage2_unet(OmegaConf.merge(ucfg, {"from_scratch": True}), pipe, latent)
    assert fresh is not pipe.unet
    assert list(fresh.config.block_out_channels) == list(ucfg.channels) == list(pipe.unet.config.block_out_channels)
    old = dict(pipe.unet.named_parameters())
    assert all(p.shape == old[n].shape for n, p in fresh.named_parameters())
    assert not any(torch.equal(p, old[n]) for n, p in fresh.named_parameters() if p.numel() > 1 and p.std() > 0)


def test_content_free_padding_replaces_only_the_chosen_rows_after_their_end_token(pipe):
    """toy.unet.padding_dropout: a chosen prompt's positions after its end token become the empty prompt's (which
    carry no prompt); its start, words and end token, and every position of the other prompts, stay."""
    from toyworld.train import PromptEncoder, content_free_padding

    enc = PromptEncoder(pipe.tokenizer)
    ids = enc.ids(["a red car", "a blue star in the park"])  # (2, L)
    with torch.no_grad():
        cond, empty = pipe.text_encoder(ids)[0], pipe.text_encoder(enc.ids([""]))[0][0]
    out = content_free_padding(cond, ids, empty, pipe.tokenizer.eos_token_id, torch.tensor([True, False]))
    n = len(pipe.tokenizer("a red car").input_ids)  # start, 3 words, end
    assert torch.equal(out[0, :n], cond[0, :n]) and torch.equal(out[0, n:], empty[n:])
    assert not torch.allclose(cond[0, n:], empty[n:])  # the padding did carry the prompt
    assert torch.equal(out[1], cond[1])
    out = content_free_padding(cond, ids, empty, pipe.tokenizer.eos_token_id, torch.tensor([True, False]), True)
    assert torch.equal(out[0, : n - 1], cond[0, : n - 1]) and torch.equal(out[0, n - 1:], empty[n - 1:])


def test_other_prompt_padding_takes_the_next_prompts_padding_aligned_at_its_end_token(pipe):
    """toy.unet.padding_source=other: a chosen prompt's padding (and end token, with_end) is the next prompt's
    (cyclically), read from that prompt's own end token on; its words, and the rows not chosen, stay."""
    from toyworld.train import PromptEncoder, other_prompt_padding

    enc = PromptEncoder(pipe.tokenizer)
    prompts = ["a red car", "a blue star in the park", ""]
    ids = enc.ids(prompts)  # (3, L)
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
    n0, n1, n2 = (len(pipe.tokenizer(p).input_ids) for p in prompts)  # start, words, end
    length, end = ids.shape[1], pipe.tokenizer.eos_token_id
    out = other_prompt_padding(cond, ids, end, torch.tensor([True, True, False]))
    assert torch.equal(out[0, :n0], cond[0, :n0]) and torch.equal(out[1, :n1], cond[1, :n1])
    assert torch.equal(out[0, n0:n0 + length - n1], cond[1, n1:])  # row 0 ← row 1's padding, then its last position
    assert torch.equal(out[0, n0 + length - n1:], cond[1, -1:].expand(n1 - n0, -1))
    assert torch.equal(out[1, n1:], cond[2, n2:n2 + length - n1])  # row 1 ← the empty prompt's padding
    assert not torch.allclose(out[0, n0:], cond[0, n0:]) and torch.equal(out[2], cond[2])
    out = other_prompt_padding(cond, ids, end, torch.tensor([True, False, False]), with_end=True)
    assert torch.equal(out[0, : n0 - 1], cond[0, : n0 - 1]) and torch.equal(out[0, n0 - 1], cond[1, n1 - 1])


def test_start_token_sink_is_written_into_the_cross_attention_queries(pipe, world):
    """toyworld.sink: every query's logit for the start token rises by the boost over the other keys' mean
    (the text encoder is causal: the start token's key is the same in every prompt)."""
    import copy

    from toyworld.sink import all_prompts, install_start_sink, text_states

    sunk = copy.deepcopy(pipe)
    report = install_start_sink(sunk, all_prompts(world)[:30], boost=6.0)
    assert len(report) == sum(".attn2." in n for n in pipe.unet.attn_processors)
    assert all(abs(r["start_lift"] - 6.0) < 0.05 for r in report)
    start, others = text_states(pipe, ["a red car"])
    changed = [name for (name, p), q in zip(pipe.unet.named_parameters(), sunk.unet.parameters())
               if not torch.equal(p, q)]
    assert changed and all(n.endswith("norm2.bias") for n in changed)  # only the cross-attention queries move


def test_exact_start_token_sink_lifts_the_start_logit_for_every_query(pipe, world):
    """toyworld.sink --method key: whatever the query, the start token's logit rises by the boost over the
    mean of the other keys it was fitted on (LayerNorm gives the query an exactly constant component); the
    other keys' logits move together up to a per-key offset much smaller than the boost."""
    import copy

    from toyworld.sink import all_prompts, cross_blocks, install_key_sink, text_states

    prompts = all_prompts(world)[:30]
    sunk = copy.deepcopy(pipe)
    install_key_sink(sunk, prompts, boost=6.0)
    start, others = text_states(pipe, prompts)
    states = torch.cat([start[None], others])  # (1 + N, D)
    g = torch.Generator().manual_seed(0)

    def logits(norm, attn, x):  # (heads, queries, keys)
        q, k = attn.to_q(norm(x)), attn.to_k(states)
        d = q.shape[1] // attn.heads
        return torch.einsum("qhd,khd->hqk", q.view(len(x), attn.heads, d), k.view(-1, attn.heads, d)) * attn.scale

    with torch.no_grad():
        for (_, norm, attn), (_, norm_s, attn_s) in zip(cross_blocks(pipe.unet), cross_blocks(sunk.unet)):
            x = torch.randn(50, norm.normalized_shape[0], generator=g) * 3 + 1  # any features
            moved = logits(norm_s, attn_s, x) - logits(norm, attn, x)
            lift = moved[..., 0] - moved[..., 1:].mean(-1)
            assert (lift - 6.0).abs().max() < 0.2
            assert (moved[..., 1:] - moved[..., 1:].mean(-1, keepdim=True)).std() < 0.1 * 6.0


def test_exact_start_token_sink_on_chosen_layers_leaves_the_others(pipe, world):
    """toyworld.sink --method key --layers: only the named cross layers' parameters move."""
    import copy

    from toyworld.sink import all_prompts, install_key_sink, model_cross_layers

    layer = model_cross_layers(pipe)[-1]
    block = layer.name.removesuffix(".attn2.processor")
    sunk = copy.deepcopy(pipe)
    report = install_key_sink(sunk, all_prompts(world)[:30], boost=6.0, layers=[layer.label])
    assert [r["label"] for r in report] == [layer.label]
    changed = {name for (name, p), q in zip(pipe.unet.named_parameters(), sunk.unet.parameters())
               if not torch.equal(p, q)}
    assert changed and all(name.startswith(block + ".") for name in changed)


def test_sink_cli_names_an_unknown_layer(capsys):
    from toyworld.sink import main

    with pytest.raises(SystemExit) as stop:
        main(["--model", str(MODEL), "--out", "unused", "--method", "key", "--layers", "cross-99"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --layers cross-99") and "cross-1 cross-2" in err[0]
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(MODEL), "--out", "unused", "--method", "query", "--layers", "cross-1"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().startswith("error: --layers is only for")


def test_colour_subspace_finds_the_direction_the_colour_moves_the_queries_along():
    """diagnose_tokens.colour_subspace: queries whose colour moves only their first coordinate give η² near 1
    along that axis, near 0 across it, and tr B / tr T for a random direction."""
    from toyworld.diagnose_tokens import colour_subspace

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 40)
    q = rng.normal(scale=3.0, size=(len(y), 1, 6, 4))  # (images, heads, positions, head dim); mean over 6: var 1.5
    q[..., 0] += 3 * y[:, None, None]
    along = colour_subspace(q, y, np.array([[1.0, 0, 0, 0]]))
    across = colour_subspace(q, y, np.array([[0, 1.0, 0, 0]]))
    assert along["eta2 along k_a - k_start"] > 0.85 and across["eta2 along k_a - k_start"] < 0.1  # 18 / 19.5, 0
    assert along["colour rank"] == 1 and along["eta2, least colour-laden direction"] < 0.1
    assert 0.5 < along["eta2, random direction"] < along["eta2 along k_a - k_start"]  # 18 / (18 + 4 × 1.5)
    assert along["eta2, most colour-laden direction"] >= along["eta2 along k_a - k_start"] - 1e-9


def test_family_prompts_cycle_the_same_fills_over_every_colour():
    """diagnose_tokens.family_prompts: with --fill, the k-th image of every colour gets fill k mod n (so the noun or
    background varies but says nothing of the colour); a template and fills that do not match are refused."""
    from toyworld.diagnose_tokens import family_prompts

    family = {"name": "cars", "template": "a {cls} car", "classes": ["green", "red", "blue"]}
    prompts, seeds, y = family_prompts(family, 3, ["red", "blue"], "a {cls} {fill}", ["circle", "star"])
    assert prompts == ["a red circle", "a red star", "a red circle", "a blue circle", "a blue star", "a blue circle"]
    assert seeds == [0, 1, 2, 0, 1, 2] and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert family_prompts(family, 2, ["red"])[0] == ["a red car", "a red car"]
    with pytest.raises(ValueError, match="fills"):
        family_prompts(family, 2, ["red"], fills=["star"])
    with pytest.raises(ValueError, match="fills"):
        family_prompts(family, 2, ["red"], "a {cls} {fill}")


def test_token_map_recorder_leaves_sampling_unchanged(pipe):
    """toyworld.diagnose_tokens records maps without changing the output (its hook returns SDPA)."""
    from sdattn.hooks import HookSet
    from sdattn.layers import enumerate_layers
    from sdattn.sampling import latent_size, sample
    from toyworld.diagnose_tokens import Positions, TokenMapRecorder, capture

    kw = dict(num_inference_steps=2, guidance_scale=2.0, decode_images=False, progress=False)
    plain = sample(pipe, ["a red car"], [0], **kw).latents
    cross = [x for x in enumerate_layers(pipe.unet, latent_size(pipe)) if x.kind == "cross"]
    sums: dict = {}
    with HookSet(pipe.unet, cross, lambda layer, state: TokenMapRecorder(layer, state, sums, Positions())) as hooks:
        hooked = sample(pipe, ["a red car"], [0], callbacks=[hooks], **kw).latents
    assert torch.allclose(plain, hooked, atol=1e-5)
    feats, layers = capture(pipe, ["a red car", "a blue car"], [0, 1], 2, 2.0, 2, Positions())
    assert {name for _, name in feats} >= {"map", "logit", "fixed keys", "mass"}
    mass = feats[(layers[0].label, "mass")]  # (images, key positions): shares of one softmax
    assert mass.shape == (2, pipe.tokenizer.model_max_length) and np.allclose(mass.sum(1), 1, atol=1e-4)


def test_reading_diagnosis_groups_positions_and_zeroing_the_whole_prompt_loses_it(pipe, world):
    """toyworld.diagnose_reading: the groups cover the prompt's positions as the tokenizer lays them out; with no
    position zeroed the shipped model draws the prompt, with every position but the start token zeroed it draws
    neither its colour nor its shape (the start token is the same in every prompt)."""
    from toyworld.diagnose_reading import kept, position_groups

    g = position_groups(pipe.tokenizer, "a red star in the park")
    n, length = len(pipe.tokenizer("a red star in the park").input_ids), pipe.tokenizer.model_max_length
    assert g["words"] == list(range(1, n - 1)) and g["end"] == [n - 1] and g["padding"] == list(range(n, length))
    assert g["all but start"] == list(range(1, length)) and g["noun"] == [3]
    assert kept(pipe, world, "a red star in the park", [], [0, 1], 25, 2.0) == (2, 2)
    assert kept(pipe, world, "a red star in the park", g["all but start"], [0, 1], 25, 2.0) == (0, 0)


def test_training_writes_under_the_working_folder_and_reads_shipped_inputs(tmp_path, monkeypatch):
    """Relative outputs land under the working folder (never in the package or over models/toy); relative
    inputs are found there first, else among the shipped data; the default output is not the shipped model."""
    from omegaconf import OmegaConf

    from toyworld.train import output_path, resolve_path

    monkeypatch.chdir(tmp_path)
    assert output_path("outputs/toy_model") == tmp_path / "outputs/toy_model"
    assert resolve_path("models/toy") == REPO_ROOT / "models/toy"
    (tmp_path / "models/toy").mkdir(parents=True)
    assert resolve_path("models/toy") == Path("models/toy")
    for name, node in (("train_toy", "toy"), ("train_toy_clip", "toy_clip")):
        cfg = OmegaConf.load(REPO_ROOT / "configs/experiment" / f"{name}.yaml")[node]
        assert not Path(cfg.output_dir).parts[0] == "models", cfg.output_dir
