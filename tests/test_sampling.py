import pytest
import torch
from diffusers import DDIMScheduler

from sdattn.errors import UserError
from sdattn.sampling import default_size, encode_prompts, initial_latents, sample


def test_default_size_and_latent_convention(tiny_pipe):
    assert default_size(tiny_pipe) == (32, 32)
    lat = initial_latents(tiny_pipe, [3, 4])
    assert lat.shape == (2, 4, 16, 16) and lat.dtype == torch.float32
    assert torch.equal(lat[1:], torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(4)))


def test_a_sample_does_not_depend_on_its_batch_neighbours(tiny_pipe):
    kw = dict(num_inference_steps=3, progress=False)
    both = sample(tiny_pipe, ["a red car", "a blue dog"], seeds=[5, 6], **kw)
    alone = sample(tiny_pipe, ["a blue dog"], seeds=[6], **kw)
    assert (both.latents[1] - alone.latents[0]).abs().max() < 1e-4
    assert both.images.shape == (2, 3, 32, 32) and 0 <= both.images.min() and both.images.max() <= 1
    assert not torch.allclose(both.latents[0], both.latents[1])


def test_prompts_padded_to_max_length_and_long_prompt_rejected(tiny_pipe):
    emb = encode_prompts(tiny_pipe, ["a red car", ""])
    assert emb.shape[:2] == (2, tiny_pipe.tokenizer.model_max_length)
    with pytest.raises(UserError, match="tokens; the text encoder allows 77"):
        encode_prompts(tiny_pipe, ["red " * 100])


def test_guidance_and_steps_go_through_the_ddim_scheduler(tiny_pipe):
    # Same loop by hand with the diffusers scheduler: matches the sampler.
    out = sample(tiny_pipe, ["a cat"], seeds=[1], num_inference_steps=3, guidance_scale=3.0, progress=False,
                 decode_images=False)
    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(3)
    lat = initial_latents(tiny_pipe, [1])
    ctx = torch.cat([encode_prompts(tiny_pipe, [""]), encode_prompts(tiny_pipe, ["a cat"])])
    with torch.no_grad():
        for t in sched.timesteps:
            u, c = tiny_pipe.unet(torch.cat([lat] * 2), t, encoder_hidden_states=ctx).sample.chunk(2)
            lat = sched.step(u + 3.0 * (c - u), t, lat).prev_sample
    assert (out.latents - lat).abs().max() < 1e-5


def test_needs_one_seed_per_prompt(tiny_pipe):
    with pytest.raises(UserError, match="one seed per prompt"):
        sample(tiny_pipe, ["a", "b"], seeds=[1], num_inference_steps=1)


def test_closed_vocabulary_rejects_unknown_words(tmp_path):
    from transformers import CLIPTokenizer

    from sdattn.sampling import check_prompts
    from sdattn.tokenizer import build_word_tokenizer

    build_word_tokenizer(["a", "red", "car"], 8, closed=True).save_pretrained(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    check_prompts(tok, ["a red car", ""])
    with pytest.raises(UserError, match=r"words outside this model's vocabulary: \['photo'\]; vocabulary: a, car, red"):
        check_prompts(tok, ["a photo car"])
    check_prompts(build_word_tokenizer(["a", "red"], 8), ["a zebra"])  # open vocabulary: letters are fine
