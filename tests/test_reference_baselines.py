"""Reference tests (issue 11): each baseline's UNet call or step computed the way the authors' code
computes it, re-implemented here from the official logic (/work/notes/fidelity.md; the official files
are named per test), against ours on the tiny SD-layout model, to 1e-5. They catch the next drift."""

from contextlib import contextmanager

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from omegaconf import OmegaConf

from editing.baselines.diffedit import diffedit_inpaint
from editing.baselines.masactrl import MutualSelfAttention, masactrl_layers
from editing.baselines.pix2pix_zero import pix2pix_zero_sample
from editing.baselines.pnp import pnp_injection
from evaluation.datasets import EditExample
from sdattn.hooks import BatchLayout, HookSet
from sdattn.sampling import decode, encode_image, encode_prompts, initial_latents, sample

from .conftest import ROOT

EX = EditExample(id="0", source_prompt="a black car", target_prompt="a red car")
METHODS = ROOT / "configs" / "method"
TOL = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- official-style attention

def split_heads(attn, x):  # (B, N, H·d) → (B, H, N, d)
    b, n, _ = x.shape
    return x.view(b, n, attn.heads, -1).transpose(1, 2)


def merge_heads(attn, o):  # (B, H, N, d) → to_out (B, N, H·d)
    b, h, n, d = o.shape
    return attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, n, h * d)))


class OfficialProcessor:
    """An attention processor computing attention by hand; ``edit(attn, q, k, v) → (q, k, v, out)``
    hooks in the official change (q, k, v: (B, N, H·d) before the head split)."""

    def __init__(self, name, edit=None):
        self.name, self.edit = name, edit

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        return merge_heads(attn, self.edit(attn, q, k, v))


def execution_order(names):
    """attn processor names in the UNet's run order (down, mid, up; diffusers registers up before mid)."""
    group = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: group[n.split(".")[0]])


@contextmanager
def processors(unet, chosen: dict):
    """``chosen`` {processor name: processor} installed, SDPA elsewhere; the originals restored."""
    before = dict(unet.attn_processors)
    unet.set_attn_processor({n: chosen.get(n, AttnProcessor2_0()) for n in before})
    try:
        yield
    finally:
        unet.set_attn_processor(before)


def ours(unet, layers, factory, step, num_steps, layout, call):
    with HookSet(unet, layers, factory) as hooks:
        hooks.on_step_begin(step, 0, num_steps, layout)
        return call()


def cfg(noise, scale):
    u, c = noise.chunk(2)
    return u + scale * (c - u)


# -------------------------------------------------------------------------------------------- MasaCtrl

def test_masactrl_unet_call_matches_official(tiny_pipe):
    """TencentARC/MasaCtrl masactrl/masactrl.py MutualSelfAttentionControl.forward: blocks
    ``cur_att_layer // 2 ∈ [10, 16)`` (run order), steps ≥ 4; per CFG half every row attends to the
    half's source K, V (``attn_batch(qu, ku[:num_heads], vu[:num_heads])``)."""
    unet = tiny_pipe.unet
    settings = OmegaConf.load(METHODS / "masactrl.yaml")
    assert settings.start_step == 4 and settings.anchor_source is False  # official: no re-anchoring
    self_names = execution_order([n for n in unet.attn_processors if n.endswith("attn1.processor")])
    chosen_names = self_names[10:]

    def mutual(attn, q, k, v):
        q, k, v = (split_heads(attn, x) for x in (q, k, v))
        half = q.shape[0] // 2
        out = []
        for s in (0, half):  # uncond half, cond half: source row = first of the half
            probs = torch.softmax(q[s:s + half] @ k[s:s + 1].transpose(-1, -2) * attn.scale, -1)
            out.append(probs @ v[s:s + 1])
        return torch.cat(out)

    latents = initial_latents(tiny_pipe, [3, 4])
    x = torch.cat([latents, latents])  # [u_src, u_tgt, c_src, c_tgt]
    context = torch.cat([encode_prompts(tiny_pipe, ["", ""]), encode_prompts(tiny_pipe, [EX.source_prompt,
                                                                                       EX.target_prompt])])
    t = torch.tensor(501)
    with torch.no_grad():
        with processors(unet, {n: OfficialProcessor(n, mutual) for n in chosen_names}):
            official = unet(x, t, encoder_hidden_states=context).sample
        layers = masactrl_layers(tiny_pipe, 10)
        assert sorted(x.name for x in layers) == sorted(chosen_names)
        mine = ours(unet, layers, lambda lay, st: MutualSelfAttention(lay, st, 4), 4, 50,
                    BatchLayout(n=2, cfg=True), lambda: unet(x, t, encoder_hidden_states=context).sample)
        plain = unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(mine, official, **TOL)
    assert (official - plain)[[1, 3]].abs().max() > 1e-4  # the target rows were changed
    torch.testing.assert_close(official[[0, 2]], plain[[0, 2]], **TOL)  # the source rows were not


def test_masactrl_real_image_source_branch_is_free_unless_anchored(tiny_pipe, make_method):
    """playground_real.ipynb: ``model(prompts, latents=start_code, guidance_scale=7.5)`` from the inverted
    z_T, the ``ref_intermediate_latents`` call commented out: both branches sampled freely by default."""
    from editing.inversion import ddim_invert
    from editing.two_branch import replacement_edit

    steps, kw = 4, dict(num_inference_steps=4, start_step=1)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    free = make_method("masactrl", **kw)(tiny_pipe, EX, 0, image=image)[1]
    anchored = make_method("masactrl", **kw, anchor_source=True)(tiny_pipe, EX, 0, image=image)[1]
    traj = ddim_invert(tiny_pipe, encode_image(tiny_pipe, image), "", steps, progress=False)
    hooks = {x: (lambda lay, st: MutualSelfAttention(lay, st, 1)) for x in masactrl_layers(tiny_pipe, 10)}
    out = replacement_edit(tiny_pipe, "", EX.target_prompt, traj[-1], hooks, steps, 7.5, progress=False)
    torch.testing.assert_close(free, decode(tiny_pipe, out[1:]), **TOL)
    assert (free - anchored).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------- PnP

def test_pnp_unet_call_matches_official(tiny_pipe):
    """MichalGeyer/pnp-diffusers pnp.py denoise_step + pnp_utils.py: batch [source "", uncond (negative),
    cond]; in ``up_blocks[1].attentions[1,2]``, ``[2].attentions[0,1,2]``, ``[3].attentions[0,1,2]`` attn1:
    ``q[1] = q[2] = q[0]``, same for k (V own); in ``up_blocks[1].resnets[1]``: the residual branch after
    conv2 of rows 1, 2 ← row 0; CFG on rows 1, 2."""
    unet = tiny_pipe.unet
    negative = OmegaConf.load(ROOT / "configs" / "model_settings" / "sd1x.yaml").pnp_negative_prompt
    names = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor"
             for b, ids in {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}.items() for a in ids]

    def inject_qk(attn, q, k, v):
        q, k = q.clone(), k.clone()
        q[1:] = q[:1]
        k[1:] = k[:1]
        q, k, v = (split_heads(attn, x) for x in (q, k, v))
        return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v

    resnet = unet.up_blocks[1].resnets[1]

    def inject_residual(module, args, output):  # h = output·s − shortcut(input): swap h, rebuild output
        x = args[0]
        skip = module.conv_shortcut(x) if module.conv_shortcut is not None else x
        h = output * module.output_scale_factor - skip
        h = torch.cat([h[:1], h[:1], h[:1]])
        return (skip + h) / module.output_scale_factor

    src_latent, latent = initial_latents(tiny_pipe, [1, 2]).chunk(2)
    emb_src, emb_neg, emb_tgt = encode_prompts(tiny_pipe, ["", negative, EX.target_prompt]).chunk(3)
    t, g = torch.tensor(751), 7.5
    with torch.no_grad():
        with processors(unet, {n: OfficialProcessor(n, inject_qk) for n in names}):
            handle = resnet.register_forward_hook(inject_residual)
            try:
                noise = unet(torch.cat([src_latent, latent, latent]), t,
                             encoder_hidden_states=torch.cat([emb_src, emb_neg, emb_tgt])).sample
            finally:
                handle.remove()
        official = noise[1] + g * (noise[2] - noise[1])
        hooks, feature = pnp_injection(tiny_pipe, 4, feature_steps=0.8, attn_steps=0.5, attn_layers="decoder",
                                       feature_block="auto")
        layout = BatchLayout(n=2, cfg=True)  # [u_src, u_tgt, c_src, c_tgt]
        x = torch.cat([src_latent, latent, src_latent, latent])
        context = torch.cat([emb_neg, emb_neg, emb_src, emb_tgt])
        assert sorted(x.name for x in hooks) == sorted(names)
        with feature.installed():
            feature.on_step_begin(0, int(t), 4, layout)
            out = ours(unet, list(hooks), lambda lay, st: hooks[lay](lay, st), 0, 4, layout,
                       lambda: unet(x, t, encoder_hidden_states=context).sample)
        mine = out[layout.uncond_row(1)] + g * (out[layout.cond_row(1)] - out[layout.uncond_row(1)])
    torch.testing.assert_close(mine, official, **TOL)


# ---------------------------------------------------------------------------------------------- SDEdit

@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_sdedit_matches_diffusers_img2img(tiny_pipe, make_method, strength):
    """diffusers ``StableDiffusionImg2ImgPipeline`` (get_timesteps, prepare_latents: fresh ``randn`` noise
    added at ``timesteps[0]``), here from the generated source latent; the noise is the seed generator's
    draw after z_T, so it is independent of the source's initial noise."""
    steps, seed = 4, 7
    edit = make_method(f"sdedit_{strength}", num_inference_steps=steps)
    source, edited = edit(tiny_pipe, EX, seed)
    z0 = sample(tiny_pipe, [EX.source_prompt], [seed], num_inference_steps=steps, decode_images=False,
                progress=False).latents
    img2img = StableDiffusionImg2ImgPipeline(**{**tiny_pipe.components, "safety_checker": None,
                                                "feature_extractor": None, "image_encoder": None},
                                             requires_safety_checker=False)
    img2img.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    z_T = torch.randn(z0.shape, generator=generator)  # the source's initial noise
    torch.testing.assert_close(z_T, initial_latents(tiny_pipe, [seed]))
    out = img2img(prompt=EX.target_prompt, image=z0, strength=strength, num_inference_steps=steps,
                  guidance_scale=7.5, generator=generator, output_type="latent").images
    torch.testing.assert_close(edited, decode(tiny_pipe, out), **TOL)


# -------------------------------------------------------------------------------------------- DiffEdit

def test_diffedit_matches_the_reference_pipeline(tiny_pipe):
    """diffusers' deprecated ``StableDiffusionDiffEditPipeline``: ``invert(prompt=source, guidance 7.5,
    inpaint_strength 0.8)`` then ``__call__`` blending ``latents·m + image_latents[i]·(1 − m)`` after
    step i (the pre-step inverted latent); the mask is given, the image passed as its latent."""
    from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline

    steps = 5
    settings = OmegaConf.load(METHODS / "diffedit.yaml")
    assert settings.blend_latent == "pre_step" and settings.inpaint_strength == 0.8
    components = {k: v for k, v in tiny_pipe.components.items() if k != "image_encoder"}
    pipe = StableDiffusionDiffEditPipeline(**{**components, "safety_checker": None, "feature_extractor": None,
                                              "inverse_scheduler": DDIMInverseScheduler.from_config(
                                                  tiny_pipe.scheduler.config)},
                                           requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    z0 = encode_image(tiny_pipe, image)
    mask = torch.zeros(1, 1, *z0.shape[-2:])
    mask[..., : z0.shape[-2] // 2, :] = 1
    inverted = pipe.invert(image=z0, prompt=EX.source_prompt, num_inference_steps=steps, inpaint_strength=0.8,
                           guidance_scale=7.5).latents
    official = pipe(prompt=EX.target_prompt, mask_image=mask[0], image_latents=inverted, num_inference_steps=steps,
                    inpaint_strength=0.8, guidance_scale=7.5, output_type="latent").images
    mine = diffedit_inpaint(tiny_pipe, z0, mask, EX.source_prompt, EX.target_prompt, steps, 7.5, 0.8,
                            inversion_guidance_scale=7.5, blend_latent="pre_step")
    torch.testing.assert_close(mine, official, **TOL)


# ---------------------------------------------------------------------------------------- pix2pix-zero

def test_pix2pix_zero_passes_match_official(tiny_pipe):
    """pix2pixzero/pix2pix-zero src/utils/edit_pipeline.py: reference loop with ``[neg, c]`` storing every
    attn2 ``attn_probs`` (all batch·heads rows); edit loop: ``x_in = cat([latents]*2)``, SGD(lr=λ) on
    ``Σ ((curr − ref)²).sum((1, 2)).mean(0)``, ε recomputed on x_in with ``[neg, c + Δ]``,
    ``latents = x_in.chunk(2)[0]``, CFG, DDIM step."""
    unet, steps, g, lam = tiny_pipe.unet, 2, 5.0, 0.15
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    maps = {}

    def record(name):
        def edit(attn, q, k, v):
            q, k, v = (attn.head_to_batch_dim(x) for x in (q, k, v))  # (B·H, N, d)
            maps[name] = attn.get_attention_scores(q, k, None)  # (B·H, N, L)
            return split_heads(attn, attn.batch_to_head_dim(torch.bmm(maps[name], v)))
        return edit

    emb_neg, emb_c = encode_prompts(tiny_pipe, ["", EX.source_prompt]).chunk(2)
    delta = encode_prompts(tiny_pipe, [EX.target_prompt]) - emb_c
    z_T = initial_latents(tiny_pipe, [5])
    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(steps)
    with processors(unet, {n: OfficialProcessor(n, record(n)) for n in cross}):
        refs, z = {}, z_T.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                noise = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([emb_neg, emb_c])).sample
                refs[int(t)] = {n: m.detach() for n, m in maps.items()}
                z = sched.step(cfg(noise, g), t, z).prev_sample
        official_ref, z = z, z_T.clone()
        context = torch.cat([emb_neg, emb_c + delta])
        for t in sched.timesteps:
            x_in = torch.cat([z, z]).detach().requires_grad_(True)
            unet(x_in, t, encoder_hidden_states=context)
            loss = sum(((maps[n] - refs[int(t)][n]) ** 2).sum((1, 2)).mean(0) for n in cross)
            (grad,) = torch.autograd.grad(loss, x_in)
            x_in = (x_in - lam * grad).detach()
            with torch.no_grad():
                noise = unet(x_in, t, encoder_hidden_states=context).sample
                z = sched.step(cfg(noise, g), t, x_in.chunk(2)[0]).prev_sample
        official_edit = z
    mine_ref, mine_edit, losses = pix2pix_zero_sample(tiny_pipe, z_T, emb_c, emb_c + delta, emb_neg, steps, g, lam)
    torch.testing.assert_close(mine_ref, official_ref, **TOL)
    torch.testing.assert_close(mine_edit, official_edit, **TOL)
    assert losses[0] > 0


# ------------------------------------------------------------------------------------- InstructPix2Pix

def test_instructpix2pix_matches_k_diffusion_euler_ancestral(tiny_pipe, make_method):
    """timbrooks/instruct-pix2pix edit_cli.py (copy): ``sample_euler_ancestral`` over
    ``CompVisDenoiser.get_sigmas(steps)`` (t = linspace(999, 0, n)), batch [cond (text, image), image only
    (null text, image), uncond (null text, zeros)], ε = u + text·(c − i) + image·(i − u), image latent
    ``encode(img).mode()``, x = randn·σ₀; the ancestral noise drawn in order from the seed's generator."""
    settings = OmegaConf.load(METHODS / "instructpix2pix.yaml")
    assert (settings.num_inference_steps, settings.guidance_scale, settings.image_guidance_scale) == (100, 7.5, 1.5)
    steps, seed = 3, 4
    method = make_method("instructpix2pix", model="tiny", num_inference_steps=steps)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, edited = method(tiny_pipe, EX, seed, image=image)
    ip2p = method.pipe
    unet, vae = ip2p.unet, ip2p.vae
    alphas = DDIMScheduler.from_config(tiny_pipe.scheduler.config).alphas_cumprod
    log_sigmas = (((1 - alphas) / alphas) ** 0.5).log()
    ts = torch.linspace(len(alphas) - 1, 0, steps, dtype=torch.float64)
    lo = ts.floor().long().clamp(max=len(alphas) - 2)
    w = (ts - lo).float()
    sigmas = torch.cat([((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp(), torch.zeros(1)])
    with torch.no_grad():
        text = encode_prompts(tiny_pipe, ["replace black with red", "", ""])
        img = vae.encode(image * 2 - 1).latent_dist.mode()
        c_concat = torch.cat([img, img, torch.zeros_like(img)])
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((1, 4, *img.shape[-2:]), generator=generator) * sigmas[0]
        for i in range(steps):
            sigma = sigmas[i]
            x_in = torch.cat([x / (sigma ** 2 + 1) ** 0.5] * 3)
            eps = unet(torch.cat([x_in, c_concat], 1), ts[i].float(), encoder_hidden_states=text).sample
            c, i_, u = eps.chunk(3)
            eps = u + 7.5 * (c - i_) + 1.5 * (i_ - u)
            denoised = x - eps * sigma
            s_next = sigmas[i + 1]
            sigma_up = (s_next ** 2 * (sigma ** 2 - s_next ** 2) / sigma ** 2) ** 0.5
            sigma_down = (s_next ** 2 - sigma_up ** 2) ** 0.5
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
            x = x + torch.randn(x.shape, generator=generator) * sigma_up
        official = (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(edited, official, **TOL)
