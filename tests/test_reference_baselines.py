"""Reference tests (issue 11): each baseline's UNet call or step computed the way the authors' code
computes it, re-implemented here from the official logic (docs/fidelity.md; the official files
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
from .test_reference_settings import OFFICIAL, separating_steps, truncated

EX = EditExample(id="0", source_prompt="a black car", target_prompt="a red car")


def official(method: str, key: str):
    return OFFICIAL[method][key][0]


def yaml(method: str):
    return OmegaConf.load(METHODS / f"{method}.yaml")
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

@pytest.mark.parametrize("first_active", [False, True])
def test_masactrl_unet_call_matches_official(tiny_pipe, compose_cfg, first_active):
    """TencentARC/MasaCtrl masactrl/masactrl.py MutualSelfAttentionControl.forward: blocks
    ``cur_att_layer // 2 ∈ [10, 16)`` (run order), steps in ``range(start_step, total)``; per CFG half every row
    attends to the half's source K, V (``attn_batch(qu, ku[:num_heads], vu[:num_heads])``). The YAML's start
    step against the official 4, at step 3 (plain) and step 4 (mutual)."""
    unet = tiny_pipe.unet
    settings = OmegaConf.to_container(compose_cfg("method=masactrl").method, resolve=True)  # SD-1.x settings
    start = official("masactrl", "start_step")
    step = start if first_active else start - 1
    self_names = execution_order([n for n in unet.attn_processors if n.endswith("attn1.processor")])
    chosen_names = self_names[official("masactrl", "start_layer"):]

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
        official_procs = {n: OfficialProcessor(n, mutual) for n in chosen_names} if step >= start else {}
        with processors(unet, official_procs):
            reference = unet(x, t, encoder_hidden_states=context).sample
        layers = masactrl_layers(tiny_pipe, settings["start_layer"])
        assert sorted(x.name for x in layers) == sorted(chosen_names)
        mine = ours(unet, layers, lambda lay, st: MutualSelfAttention(lay, st, settings["start_step"]), step, 50,
                    BatchLayout(n=2, cfg=True), lambda: unet(x, t, encoder_hidden_states=context).sample)
        plain = unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(mine, reference, **TOL)
    assert ((reference - plain)[[1, 3]].abs().max() > 1e-4) == first_active  # the target rows were changed
    torch.testing.assert_close(reference[[0, 2]], plain[[0, 2]], **TOL)  # the source rows were not


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

PNP_CUTS = [(key, last) for key in ("attn_steps", "feature_steps") for last in (True, False)]


@pytest.mark.parametrize("key,last_active", PNP_CUTS)
def test_pnp_unet_call_matches_official(tiny_pipe, key, last_active):
    """MichalGeyer/pnp-diffusers pnp.py denoise_step + pnp_utils.py: batch [source "", uncond (negative),
    cond]; in ``up_blocks[1].attentions[1,2]``, ``[2].attentions[0,1,2]``, ``[3].attentions[0,1,2]`` attn1:
    ``q[1] = q[2] = q[0]``, same for k (V own), on the first int(N·pnp_attn_t) steps; in
    ``up_blocks[1].resnets[1]``: the residual branch after conv2 of rows 1, 2 ← row 0 on the first
    int(N·pnp_f_t); CFG on rows 1, 2. The YAML's fractions against the official 0.5 / 0.8 at the last active
    step and the first inactive one of each (N = 7: attention steps 2, 3; features 4, 5)."""
    unet = tiny_pipe.unet
    settings = yaml("pnp")
    negative = OmegaConf.load(ROOT / "configs" / "model_settings" / "sd1x.yaml").pnp_negative_prompt
    n = separating_steps(official("pnp", key), truncated)
    step = truncated(official("pnp", key), n) - (1 if last_active else 0)
    attn_on = step < truncated(official("pnp", "attn_steps"), n)
    feature_on = step < truncated(official("pnp", "feature_steps"), n)
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

    def reference(qk: bool, residual: bool) -> torch.Tensor:
        with processors(unet, {n: OfficialProcessor(n, inject_qk) for n in names} if qk else {}):
            handle = resnet.register_forward_hook(inject_residual) if residual else None
            try:
                noise = unet(torch.cat([src_latent, latent, latent]), t,
                             encoder_hidden_states=torch.cat([emb_src, emb_neg, emb_tgt])).sample
            finally:
                if handle is not None:
                    handle.remove()
        return noise[1] + g * (noise[2] - noise[1])

    with torch.no_grad():
        expected = reference(attn_on, feature_on)
        hooks, feature = pnp_injection(tiny_pipe, n, feature_steps=settings.feature_steps,
                                       attn_steps=settings.attn_steps, attn_layers="decoder", feature_block="auto")
        layout = BatchLayout(n=2, cfg=True)  # [u_src, u_tgt, c_src, c_tgt]
        x = torch.cat([src_latent, latent, src_latent, latent])
        context = torch.cat([emb_neg, emb_neg, emb_src, emb_tgt])
        assert sorted(x.name for x in hooks) == sorted(names)
        with feature.installed():
            feature.on_step_begin(step, int(t), n, layout)
            out = ours(unet, list(hooks), lambda lay, st: hooks[lay](lay, st), step, n, layout,
                       lambda: unet(x, t, encoder_hidden_states=context).sample)
        mine = out[layout.uncond_row(1)] + g * (out[layout.cond_row(1)] - out[layout.uncond_row(1)])
        without = reference(attn_on and key != "attn_steps", feature_on and key != "feature_steps")
    torch.testing.assert_close(mine, expected, **TOL)
    assert ((expected - without).abs().max() > 1e-4) == last_active  # this injection is on exactly until its cut


# ---------------------------------------------------------------------------------------------- SDEdit

@pytest.mark.parametrize("method", ["sdedit_0.5", "sdedit_0.75"])
def test_sdedit_matches_diffusers_img2img(tiny_pipe, make_method, method):
    """diffusers ``StableDiffusionImg2ImgPipeline`` (get_timesteps: int(N·strength) steps, prepare_latents: fresh
    ``randn`` noise added at ``timesteps[0]``) with the official strength, here from the generated source latent;
    ours with the YAML's, at a step count where a strength one value off, or rounding, starts elsewhere
    (0.5: N = 7, 0.75: N = 9). The noise is the seed generator's draw after z_T, so it is independent of the
    source's initial noise."""
    strength = official(method, "strength")
    steps, seed = separating_steps(strength, truncated), 7
    edit = make_method(method, num_inference_steps=steps)
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

def diffedit_pipeline(tiny_pipe):
    from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline

    components = {k: v for k, v in tiny_pipe.components.items() if k != "image_encoder"}
    pipe = StableDiffusionDiffEditPipeline(**{**components, "safety_checker": None, "feature_extractor": None,
                                              "inverse_scheduler": DDIMInverseScheduler.from_config(
                                                  tiny_pipe.scheduler.config)},
                                           requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffedit_matches_the_reference_pipeline(tiny_pipe):
    """diffusers' deprecated ``StableDiffusionDiffEditPipeline``: ``invert(prompt=source, guidance 7.5,
    inpaint_strength 0.8)`` then ``__call__`` blending ``latents·m + image_latents[i]·(1 − m)`` after
    step i (the pre-step inverted latent); the mask is given, the image passed as its latent. Ours with the
    YAML's inpaint_strength and blend_latent, at N = 7 (int(0.8·7) = 5 steps; 0.7, 0.9 or rounding: 4 or 6)."""
    settings = yaml("diffedit")
    strength = official("diffedit", "inpaint_strength")
    steps = separating_steps(strength, truncated)
    pipe = diffedit_pipeline(tiny_pipe)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    z0 = encode_image(tiny_pipe, image)
    mask = torch.zeros(1, 1, *z0.shape[-2:])
    mask[..., : z0.shape[-2] // 2, :] = 1
    guidance = official("diffedit", "inversion_guidance_scale")
    inverted = pipe.invert(image=z0, prompt=EX.source_prompt, num_inference_steps=steps, inpaint_strength=strength,
                           guidance_scale=guidance).latents
    reference = pipe(prompt=EX.target_prompt, mask_image=mask[0], image_latents=inverted, num_inference_steps=steps,
                     inpaint_strength=strength, guidance_scale=7.5, output_type="latent").images
    mine = diffedit_inpaint(tiny_pipe, z0, mask, EX.source_prompt, EX.target_prompt, steps, 7.5,
                            settings.inpaint_strength, inversion_guidance_scale=guidance,
                            blend_latent=settings.blend_latent)
    torch.testing.assert_close(mine, reference, **TOL)


def test_diffedit_mask_matches_the_reference_generate_mask(tiny_pipe):
    """diffusers' ``StableDiffusionDiffEditPipeline.generate_mask`` with the official defaults (10 maps,
    encode strength 0.5, thresholding ratio 3.0, CFG 7.5, the noise one draw of the seed's generator) against
    ``diffedit_mask`` with the YAML's, at N = 7 (int(0.5·7) = 3 noising steps; 0.4, 0.6 or rounding: 2 or 4)."""
    from editing.baselines.diffedit import diffedit_mask

    settings, seed = yaml("diffedit"), 4
    steps = separating_steps(official("diffedit", "mask_encode_strength"), truncated)
    pipe = diffedit_pipeline(tiny_pipe)
    z0 = encode_image(tiny_pipe, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    keys = ("mask_encode_strength", "num_maps_per_mask", "mask_thresholding_ratio")

    def masks(**override):
        reference = pipe.generate_mask(image=z0, source_prompt=EX.source_prompt, target_prompt=EX.target_prompt,
                                       num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                                       generator=torch.Generator().manual_seed(seed),
                                       **({k: official("diffedit", k) for k in keys} | override))
        mine = diffedit_mask(tiny_pipe, z0, EX.source_prompt, EX.target_prompt, seed, steps, 7.5,
                             **({k: settings[k] for k in keys} | override))
        assert mine.shape == (1, 1, *z0.shape[-2:]) and 0 < mine.mean() < 1  # both regions: a border that can move
        return mine[0, 0].numpy().astype(int).tolist(), reference[0].astype(int).tolist()

    mine, reference = masks()  # the official defaults (a small mask on the tiny random model)
    assert mine == reference
    # a ratio that splits this model's map about evenly (both sides): the encode strength and the number of maps
    # from the YAML move many pixels of it when one value off
    mine, reference = masks(mask_thresholding_ratio=2.0)
    assert mine == reference


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


@torch.no_grad()
def reference_regularized_inversion(pipe, z0, prompt: str, num_steps: int, seed: int, reg: dict) -> torch.Tensor:
    """pix2pix-zero ``src/utils/ddim_inv.py`` (DDIMInversion.__call__ with guidance_scale=1, as
    ``src/inversion.py`` calls it) and ``utils/scheduler.py`` (``step(reverse=True)``), from the algorithm: the
    sampling timesteps ascending without the first and the last; at t the predicted ε is regularised —
    ``num_reg_steps`` rounds of ``num_auto_corr_rolls`` gradient steps of size λ_ac / rolls on the
    auto-correlation penalty (per channel and per level of a 2×2-mean pyramid down to ≤ 8 px: the squared means
    of x·roll(x, r) along height and width, r uniform in [1, side / 2), drawn here from a torch generator
    seeded with ``seed``), then one step of size λ_kl on the KL penalty — and the latent goes from ᾱ[t − 1]
    to ᾱ[t − 1 + 1000/N]."""
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(num_steps)
    alphas, gap = sched.alphas_cumprod, sched.config.num_train_timesteps // num_steps
    draws = torch.Generator().manual_seed(seed)

    def auto_correlation(e):
        total = 0.0
        for c in range(e.shape[1]):
            x = e[:, c:c + 1]
            while True:
                r = int(torch.randint(1, x.shape[-1] // 2, (1,), generator=draws))
                total = total + (x * x.roll(r, 2)).mean() ** 2 + (x * x.roll(r, 3)).mean() ** 2
                if x.shape[-1] <= 8:
                    break
                x = torch.nn.functional.avg_pool2d(x, 2)
        return total

    def kl(e):
        return e.var() + e.mean() ** 2 - 1 - torch.log(e.var() + 1e-7)

    def gradient(penalty, e):
        with torch.enable_grad():
            e = e.detach().requires_grad_(True)
            return torch.autograd.grad(penalty(e), e)[0]

    text = encode_prompts(pipe, [prompt])
    z = z0
    for t in sched.timesteps.flip(0)[1:-1]:
        e = pipe.unet(z, t, encoder_hidden_states=text).sample
        for _ in range(reg["num_reg_steps"]):
            for _ in range(reg["num_auto_corr_rolls"]):
                e = e - reg["lambda_auto_corr"] / reg["num_auto_corr_rolls"] * gradient(auto_correlation, e)
            e = e - reg["lambda_kl"] * gradient(kl, e)
        a, a_next = alphas[int(t) - 1], alphas[int(t) - 1 + gap]
        z = a_next.sqrt() * (z - (1 - a).sqrt() * e) / a.sqrt() + (1 - a_next).sqrt() * e
    return z


def test_pix2pix_zero_regularized_inversion_matches_official(tiny_pipe):
    """Our regularised inversion with the YAML's noise_regularization and inversion_schedule against the
    official loop with the official values (λ_ac = λ_kl = 20, 5 rounds of 5 rolls; 48 of 50 steps: here 3 of
    5). A roll drawn from [0, side/2), one round or roll more or less, or a λ off shows."""
    from editing.baselines.pix2pix_zero import regularized_inversion

    settings = yaml("pix2pix_zero")
    reg = {k: official("pix2pix_zero", f"noise_regularization.{k}") for k in
           ("lambda_auto_corr", "lambda_kl", "num_reg_steps", "num_auto_corr_rolls")}
    z0 = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    mine = regularized_inversion(tiny_pipe, z0, EX.source_prompt, 5, seed=3, schedule=settings.inversion_schedule,
                                 **OmegaConf.to_container(settings.noise_regularization))
    reference = reference_regularized_inversion(tiny_pipe, z0, EX.source_prompt, 5, 3, reg)
    torch.testing.assert_close(mine, reference, **TOL)
    unregularized = reference_regularized_inversion(tiny_pipe, z0, EX.source_prompt, 5, 3, {**reg, "num_reg_steps": 0})
    assert (reference - unregularized).abs().max() > 1e-3  # the regularisation matters here


# ---------------------------------------------------------------------------------------------- Shape-Guided

@torch.no_grad()
def reference_shape_guided(pipe, z0, mask, source: str, target: str, num_steps: int, guidance: float, hooks):
    """shape-guided-diffusion ``shape_guided_diffusion.py`` with ``utils.inversion(run_inversion=True)``, from the
    algorithm (``hooks``: the inside-outside attention of inversion and edit, checked on its own in
    tests/test_shape_guided.py): timesteps t_1 < … < t_N; inversion z0 at level t_1 up to t_N in N − 1 steps
    (the UNet at the level left, unguided, the source prompt); sampling from there with ε_u + w·(ε_c − ε_u), each
    step to the next lower level and the last one to ᾱ = 1; after step i the background is the inversion latent
    of that step's input level (``xts[-i - 1]``; the last step: z0)."""
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(num_steps)
    levels = sched.timesteps.flip(0).tolist()  # t_1 … t_N
    alpha = {t: float(sched.alphas_cumprod[t]) for t in levels}

    def move(z, eps, a, a_next):
        return a_next ** 0.5 * (z - (1 - a) ** 0.5 * eps) / a ** 0.5 + (1 - a_next) ** 0.5 * eps

    inversion_hooks, edit_hooks = hooks
    src, tgt, null = encode_prompts(pipe, [source]), encode_prompts(pipe, [target]), encode_prompts(pipe, [""])
    xs = [z0]
    with inversion_hooks:
        for t, t_next in zip(levels[:-1], levels[1:]):
            xs.append(move(xs[-1], pipe.unet(xs[-1], t, encoder_hidden_states=src).sample, alpha[t], alpha[t_next]))
    keep = torch.nn.functional.interpolate(mask, size=z0.shape[-2:], mode="nearest-exact")
    z = xs[-1]
    with edit_hooks:
        for i, t in enumerate(reversed(levels)):
            eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([null, tgt])).sample.chunk(2)
            a_next = alpha[levels[-i - 2]] if i < num_steps - 1 else 1.0
            z = move(z, eps_u + guidance * (eps_c - eps_u), alpha[t], a_next)
            z = xs[-i - 1] * (1 - keep) + z * keep
    return z


def test_shape_guided_schedule_matches_official(tiny_pipe):
    from editing.baselines.shape_guided import (
        InsideOutsideAttention,
        edited_tokens,
        shape_guided_latents,
        token_scales,
    )
    from editing.two_branch import model_layers

    src, tgt, steps, guidance = "a photo of a cat", "a photo of a red dog", 4, 4.5
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    z0 = encode_image(tiny_pipe, image)
    mask = (torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    mine = shape_guided_latents(tiny_pipe, z0, mask, src, tgt, cross_attn_scale=2.5, self_attn_scale=1.0,
                                inversion="inside_outside", num_inference_steps=steps, guidance_scale=guidance)
    s_pos, t_pos, fixed = edited_tokens(tiny_pipe.tokenizer, src, tgt)
    layers, length = model_layers(tiny_pipe), tiny_pipe.tokenizer.model_max_length

    def hooks(scales):
        return HookSet(tiny_pipe.unet, layers, lambda lay, st: InsideOutsideAttention(lay, st, mask, scales, 1.0))

    reference = reference_shape_guided(tiny_pipe, z0, mask, src, tgt, steps, guidance,
                                       (hooks(token_scales(length, s_pos, (), 2.5)),
                                        hooks(token_scales(length, t_pos, fixed, 2.5))))
    torch.testing.assert_close(mine, reference, **TOL)


def test_shape_guided_masks_resize_as_pil_nearest(tiny_pipe):
    """shape-guided-diffusion ``utils.py: preprocess_segm`` / ``preprocess.py``: the mask image resized with
    ``PIL.Image.NEAREST`` to each layer's side and to the latent."""
    import numpy as np
    from PIL import Image

    from editing.baselines.shape_guided import resize_mask
    from editing.two_branch import model_layers

    mask = np.random.default_rng(0).random((37, 37)) > 0.5
    for side in sorted({x.height for x in model_layers(tiny_pipe)}):
        want = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 127
        got = resize_mask(torch.from_numpy(mask)[None, None], side, side)[0, 0].numpy() > 0.5
        assert np.array_equal(got, want), side


def test_squash_lanczos_is_the_official_pix2pix_zero_and_shape_guided_resize(tmp_path):
    """pix2pix-zero ``src/inversion.py``: ``Image.open(p).resize((512, 512), Image.Resampling.LANCZOS)``;
    Shape-Guided ``preprocess.preprocess_image``: ``image.resize((w, h), resample=PIL.Image.LANCZOS)``."""
    import numpy as np
    from PIL import Image

    from editing.images import load_image

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(photo)
    want = np.asarray(Image.open(photo).resize((48, 40), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    got = load_image(photo, (40, 48), "squash_lanczos")[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)
    assert not np.array_equal(load_image(photo, (40, 48), "squash")[0].permute(1, 2, 0).numpy(), want)


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
