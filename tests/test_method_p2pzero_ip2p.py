"""pix2pix-zero and InstructPix2Pix on the tiny model (few DDIM steps)."""

import pytest
import torch
from omegaconf import OmegaConf

from editing.baselines.instructpix2pix import build_tiny_ip2p, changed_words, load_ip2p, make_instruction
from editing.baselines.pix2pix_zero import (
    MAPS,
    cfg_step,
    edit_direction,
    guidance_recorder,
    guidance_step,
    mean_embedding,
    regularized_inversion,
    template_sentences,
    write_sentence_banks,
)
from editing.inversion import ddim_invert
from evaluation.datasets import EditExample
from sdattn.errors import ModelLoadError, UserError
from sdattn.sampling import ddim_scheduler, encode_prompts, initial_latents, sample

from .conftest import ROOT

STEPS = 4
P2PZ = OmegaConf.load(ROOT / "configs" / "method" / "pix2pix_zero.yaml")
EX = EditExample(id="0", source_prompt="a black car", target_prompt="a red car")


def _check(img, like=None):
    assert img.shape[:2] == (1, 3) and torch.isfinite(img).all()
    assert img.min() >= 0 and img.max() <= 1
    if like is not None:
        assert img.shape == like.shape


def _processors(pipe):
    return {k: type(v) for k, v in pipe.unet.attn_processors.items()}


@pytest.fixture
def real_image(tiny_pipe):
    from sdattn.sampling import default_size

    h, w = default_size(tiny_pipe)
    return torch.rand((1, 3, h, w), generator=torch.Generator().manual_seed(3))


# -------------------------------------------------------------------------------------- pix2pix-zero

def test_p2pzero_generated_and_real(tiny_pipe, make_method, real_image):
    before = _processors(tiny_pipe)
    cfg = {"num_inference_steps": STEPS, "noise_regularization": {"num_reg_steps": 1, "num_auto_corr_rolls": 1}}
    edit = make_method("pix2pix_zero", **cfg)
    src, edited = edit(tiny_pipe, EX, 5)
    _check(src), _check(edited, src)
    ref = sample(tiny_pipe, ["a black car"], seeds=[5], num_inference_steps=STEPS, guidance_scale=P2PZ.guidance_scale,
                 progress=False).images
    torch.testing.assert_close(src, ref, atol=1e-5, rtol=1e-5)  # source = plain generation
    assert (edited - src).abs().max() > 1e-4
    src, edited = edit(tiny_pipe, EX, 5, image=real_image)
    assert src is real_image
    _check(edited, real_image)
    assert _processors(tiny_pipe) == before


def test_p2pzero_zero_direction_reproduces_source(tiny_pipe, make_method):
    same = EditExample(id="1", source_prompt="a black car", target_prompt="a black car")
    ref = sample(tiny_pipe, ["a black car"], seeds=[2], num_inference_steps=STEPS, guidance_scale=P2PZ.guidance_scale,
                 progress=False).images
    src, edited = make_method("pix2pix_zero", num_inference_steps=STEPS,
                              cross_attention_guidance_amount={"real": 0.0, "generated": 0.0})(tiny_pipe, same, 2)
    torch.testing.assert_close(src, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(edited, ref, atol=1e-5, rtol=1e-5)
    # with guidance on, equal maps give (numerically) zero gradient: still the source
    _, edited = make_method("pix2pix_zero", num_inference_steps=STEPS)(tiny_pipe, same, 2)
    torch.testing.assert_close(edited, ref, atol=1e-4, rtol=1e-4)


def test_cross_attention_guidance_moves_latents(tiny_pipe):
    unet, sched = tiny_pipe.unet, ddim_scheduler(tiny_pipe)
    unet.zero_grad(set_to_none=True)  # the session model may carry .grad from other tests' backward passes
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    z = initial_latents(tiny_pipe, [0])
    src, tgt = encode_prompts(tiny_pipe, ["a black car"]), encode_prompts(tiny_pipe, ["a red car"])
    recorder = guidance_recorder(tiny_pipe)
    with torch.no_grad(), recorder.installed(unet):
        cfg_step(unet, sched, recorder, 0, t, STEPS, z, src, None, 1.0)  # reference maps of the source
        ref = recorder[MAPS]
        same, loss0 = guidance_step(unet, sched, recorder, ref, 0, t, STEPS, z, src, None, 0.1)
        moved, loss1 = guidance_step(unet, sched, recorder, ref, 0, t, STEPS, z, tgt, None, 0.1)
    assert len(ref) == 16 and all(m.shape[:2] == (1, 8) for m in ref.values())  # (cond row, heads, N, L)
    assert not recorder.active and recorder[MAPS] == {}
    assert loss0 < 1e-8 and (same - z).abs().max() < 1e-6
    assert loss1 > 0 and (moved - z).abs().max() > 0
    assert all(p.grad is None for p in unet.parameters())  # the shared model's weights get no .grad


def test_direction_is_mean_difference(tiny_pipe, make_method, tmp_path):
    srcs, tgts = ["a black car", "a photo of a black car"], ["a red car", "a red car in a park", "the red car"]
    cfg = {"direction": "sentences", "source_sentences": srcs, "target_sentences": tgts}
    d = edit_direction(tiny_pipe, "x", "y", **cfg)
    want = encode_prompts(tiny_pipe, tgts).mean(0, keepdim=True) - encode_prompts(tiny_pipe, srcs).mean(0, keepdim=True)
    assert d.shape == want.shape == (1, 77, 32)
    torch.testing.assert_close(d, want, atol=1e-5, rtol=1e-5)
    d = edit_direction(tiny_pipe, "a black car", "a red car", "prompts")
    want = encode_prompts(tiny_pipe, ["a red car"]) - encode_prompts(tiny_pipe, ["a black car"])
    torch.testing.assert_close(d, want, atol=1e-5, rtol=1e-5)
    (tmp_path / "t.txt").write_text("\n".join(tgts) + "\n")
    torch.save(want[0], tmp_path / "e.pt")
    torch.testing.assert_close(mean_embedding(tiny_pipe, str(tmp_path / "t.txt")),
                               encode_prompts(tiny_pipe, tgts).mean(0, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_embedding(tiny_pipe, str(tmp_path / "e.pt")), want)
    for bad in ({"direction": "words"}, {"direction": "sentences", "source_sentences": srcs},
                {"source_sentences": srcs, "target_sentences": tgts}):
        with pytest.raises(UserError):
            edit_direction(tiny_pipe, "a black car", "a red car", **{"direction": "prompts", **bad})
    with pytest.raises(UserError, match="negative"):
        make_method("pix2pix_zero", num_inference_steps=1,
                    cross_attention_guidance_amount={"real": -1, "generated": -1})(tiny_pipe, EX, 0)


def test_sentence_banks_are_the_template_output_and_give_the_direction(tiny_pipe, tmp_path):
    import yaml

    world = yaml.safe_load((ROOT / "datasets" / "toy_world.yaml").read_text())
    shipped = sorted((ROOT / "datasets" / "pix2pix_zero").glob("*.txt"))
    assert {"red", "black", "car", "circle", "silver"} <= {p.stem for p in shipped}
    for path in write_sentence_banks(tmp_path, world, [p.stem for p in shipped]):
        assert path.read_text() == (ROOT / "datasets" / "pix2pix_zero" / path.name).read_text(), path.name
    assert "an orange star in the park" in template_sentences("orange", world)
    assert len(template_sentences("car", world)) == len(world["colors"]) * len(world["backgrounds"])
    banks = ROOT / "datasets" / "pix2pix_zero"
    d = edit_direction(tiny_pipe, "a black car", "a red car", "banks", sentence_banks=banks, missing_bank="error")
    want = (encode_prompts(tiny_pipe, template_sentences("red", world)).mean(0, keepdim=True)
            - encode_prompts(tiny_pipe, template_sentences("black", world)).mean(0, keepdim=True))
    torch.testing.assert_close(d, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="no sentence banks"):
        edit_direction(tiny_pipe, "a black dog", "a red cat", "banks", sentence_banks=banks, missing_bank="error")
    fallback = edit_direction(tiny_pipe, "a dog", "a cat in the park", "banks", sentence_banks=banks,
                              missing_bank="prompts")
    torch.testing.assert_close(fallback, edit_direction(tiny_pipe, "a dog", "a cat in the park", "prompts"))


def test_official_inversion_schedule(tiny_pipe):
    from editing.baselines.pix2pix_zero import inversion_steps

    alphas = ddim_scheduler(tiny_pipe).alphas_cumprod
    steps = inversion_steps(tiny_pipe, 50, "official")  # pix2pix-zero ddim_inv.py: timesteps.flip(0)[1:-1]
    assert [t for t, _, _ in steps] == list(range(21, 962, 20))
    assert steps[0][1:] == (float(alphas[20]), float(alphas[40])) and steps[-1][2] == float(alphas[980])
    assert [t for t, _, _ in inversion_steps(tiny_pipe, 50, "full")] == list(range(1, 982, 20))
    with pytest.raises(UserError, match="inversion_schedule"):
        inversion_steps(tiny_pipe, 50, "nope")


def test_regularized_inversion_without_regularization_is_ddim(tiny_pipe, real_image):
    from sdattn.sampling import encode_image

    z0 = encode_image(tiny_pipe, real_image)
    plain = ddim_invert(tiny_pipe, z0, "a black car", STEPS, progress=False)[-1]
    yaml = OmegaConf.load(ROOT / "configs" / "method" / "pix2pix_zero.yaml").noise_regularization
    off = {**yaml, "num_reg_steps": 0}
    full = regularized_inversion(tiny_pipe, z0, "a black car", STEPS, seed=0, schedule="full", **off)
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=1e-5)
    reg = regularized_inversion(tiny_pipe, z0, "a black car", STEPS, seed=0, schedule="full",
                                **{**yaml, "num_reg_steps": 1, "num_auto_corr_rolls": 1})
    assert torch.isfinite(reg).all() and (reg - plain).abs().max() > 0


# ----------------------------------------------------------------------------------- InstructPix2Pix

def test_instruction_template():
    ip2p = OmegaConf.load(ROOT / "configs" / "method" / "instructpix2pix.yaml")
    defaults = (ip2p.instruction, ip2p.instruction_fallback)
    assert changed_words("a black car", "a red car") == ("black", "red")
    assert make_instruction("a black car", "a red car", *defaults) == "replace black with red"
    template = "make the {old} car {new} ({source} → {target})"
    assert make_instruction("a black car", "a red car", template, defaults[1]) == \
        "make the black car red (a black car → a red car)"
    assert make_instruction("a car", "a red car", *defaults) == "turn it into a red car"  # insertion: fallback
    for bad in ("make it {colour}", "make it {}", "make it {0}", "unbalanced {old"):
        with pytest.raises(UserError) as e:
            make_instruction("a black car", "a red car", bad, defaults[1])
        assert "\n" not in str(e.value)


def test_ip2p_tiny_generated_and_real(tiny_pipe, make_method, real_image):
    before = _processors(tiny_pipe)
    method = make_method("instructpix2pix", model="tiny", num_inference_steps=STEPS, source_num_inference_steps=STEPS)
    src, edited = method(tiny_pipe, EX, 5)
    _check(src), _check(edited, src)
    ref = sample(tiny_pipe, ["a black car"], seeds=[5], num_inference_steps=STEPS, progress=False).images
    torch.testing.assert_close(src, ref, atol=1e-5, rtol=1e-5)  # source from the base pipe
    ip2p = method.pipe
    assert ip2p.unet.config.in_channels == 8 and type(ip2p.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    again = method(tiny_pipe, EX, 5)[1]
    assert method.pipe is ip2p  # loaded once, kept on the instance
    torch.testing.assert_close(again, edited)  # seeded
    src, edited = method(tiny_pipe, EX, 5, image=real_image)
    assert src is real_image
    _check(edited, real_image)
    assert _processors(tiny_pipe) == before


def test_ip2p_resizes_to_its_own_size(tiny_pipe, make_method, real_image):
    import torch.nn.functional as F

    method = make_method("instructpix2pix", model="tiny", num_inference_steps=2)
    small = F.interpolate(real_image, scale_factor=0.5)
    src, edited = method(tiny_pipe, EX, 1, image=small)
    _check(edited, small)


def test_ip2p_loads_a_local_folder(tiny_pipe, make_method, tmp_path):
    build_tiny_ip2p(tiny_pipe).save_pretrained(tmp_path / "ip2p")
    folder = str(tmp_path / "ip2p")
    from_folder = make_method("instructpix2pix", num_inference_steps=2, model=folder,
                              source_num_inference_steps=2)(tiny_pipe, EX, 1)[1]
    torch.testing.assert_close(from_folder,
                               make_method("instructpix2pix", num_inference_steps=2, model="tiny",
                                           source_num_inference_steps=2)(tiny_pipe, EX, 1)[1])


def test_ip2p_load_errors(tmp_path, make_method, tiny_pipe):
    for model in (str(tmp_path / "missing"), "nobody/no-such-instruct-pix2pix"):
        with pytest.raises(ModelLoadError) as e:
            load_ip2p(model)
        assert "\n" not in str(e.value) and model in str(e.value)
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        make_method("instructpix2pix", model="nobody/no-such-instruct-pix2pix", num_inference_steps=1)(tiny_pipe, EX, 0)
    with pytest.raises(UserError, match="unknown field"):
        make_method("instructpix2pix", model="tiny", instruction="{bogus}", num_inference_steps=1)(tiny_pipe, EX, 0)
