"""Every method config's defaults against the authors' values (the table below names the file each value is
set in), and the step cut-off rules the reference tests use to pick step counts at which a wrong rule shows.

A setting of ``configs/method/<name>.yaml`` is either in :data:`OFFICIAL` (its value must equal the official
one, on the SD-1.x settings) or in :data:`OURS` (no official counterpart, or kept different: the reason is
given, and docs/fidelity.md names it). A new setting in neither table fails the test."""

import pytest
from omegaconf import OmegaConf

FPE = "alibaba/EasyNLP diffusion/FreePromptEditing/"
P2P = "google/prompt-to-prompt "
DIFFEDIT = "diffusers pipeline_stable_diffusion_diffedit.py "
P2PZ = "pix2pixzero/pix2pix-zero src/"
NULL_TEXT = {"inner_steps": (10, "NullInversion.null_optimization(num_inner_steps=10)"),
             "lr": (1e-2, "Adam(lr=1e-2 * (1. - i / 100.))"),
             "lr_decay": (1e-2, "Adam(lr=1e-2 * (1. - i / 100.))"),
             "early_stop": (1e-5, "null_optimization(epsilon=1e-5)"),
             "early_stop_growth": (2e-5, "loss < epsilon + i * 2e-5")}

# method → {setting (dotted for nested keys): (official value, where the authors set it)}
OFFICIAL = {
    "fpe": {
        "layers": ("official", FPE + "Freeprompt/freeprompt.py: att_replace.shape[2] <= 32 ** 2 (SD 1.5 self 3-13)"),
        "self_replace_steps": (0.8, FPE + "edit_fake.ipynb, edit_real.ipynb: self_replace_steps = .8"),
        "inversion": ("ddim", FPE + "edit_real.ipynb: pipe.invert(...), ref_intermediate_latents=latents_list"),
        "real_source_prompt": ("empty", FPE + "edit_real.ipynb: source_prompt = \"\""),
        "num_inference_steps": (50, FPE + "edit_fake.ipynb: NUM_DIFFUSION_STEPS = 50"),
        "guidance_scale": (7.5, FPE + "edit_fake.ipynb, edit_real.ipynb: guidance_scale=7.5"),
        **{f"null_text.{k}": (v, FPE + "null_text_w_FPE.ipynb: " + where) for k, (v, where) in NULL_TEXT.items()},
    },
    "p2p": {
        "cross_replace_steps": (0.8, P2P + "null_text_w_ptp.ipynb: cross_replace_steps = {'default_': .8}"),
        "self_replace_steps.generated": (0.4, P2P + "prompt-to-prompt_stable.ipynb: self_replace_steps=.4"),
        "self_replace_steps.real": (0.5, P2P + "null_text_w_ptp.ipynb: self_replace_steps = .5"),
        "cross_layers": ("all", P2P + "AttentionControlEdit.forward: every cross layer (if is_cross)"),
        "self_layers.generated": ("stable", P2P + "prompt-to-prompt_stable.ipynb: att_replace.shape[2] <= 16 ** 2"),
        "self_layers.real": ("official", P2P + "null_text_w_ptp.ipynb: att_replace.shape[2] <= 32 ** 2"),
        "local_blend.threshold": (0.3, P2P + "LocalBlend(..., th=(.3, .3))"),
        "local_blend.start_blend": (0.2, P2P + "LocalBlend(..., start_blend=0.2)"),
        "reweight.values": ([2.0], P2P + "null_text_w_ptp.ipynb: eq_params = {'words': ('tiger',), 'values': (2,)}"),
        "num_inference_steps": (50, P2P + "null_text_w_ptp.ipynb: NUM_DDIM_STEPS = 50"),
        "guidance_scale": (7.5, P2P + "null_text_w_ptp.ipynb: GUIDANCE_SCALE = 7.5"),
        **{f"null_text.{k}": (v, P2P + "null_text_w_ptp.ipynb: " + where) for k, (v, where) in NULL_TEXT.items()},
    },
    "masactrl": {
        "start_step": (4, "TencentARC/MasaCtrl playground.ipynb, playground_real.ipynb: STEP = 4"),
        "start_layer": (10, "TencentARC/MasaCtrl playground.ipynb, playground_real.ipynb: LAYPER = 10"),
        "real_source_prompt": ("empty", "TencentARC/MasaCtrl playground_real.ipynb: source_prompt = \"\""),
        "anchor_source": (False, "TencentARC/MasaCtrl playground_real.ipynb: the ref_intermediate_latents call "
                                 "commented out"),
        "num_inference_steps": (50, "TencentARC/MasaCtrl playground_real.ipynb: num_inference_steps=50"),
        "guidance_scale": (7.5, "TencentARC/MasaCtrl playground.ipynb: guidance_scale=7.5"),
    },
    "pnp": {
        "feature_steps": (0.8, "MichalGeyer/pnp-diffusers config_pnp.yaml: pnp_f_t: 0.8"),
        "attn_steps": (0.5, "MichalGeyer/pnp-diffusers config_pnp.yaml: pnp_attn_t: 0.5"),
        "attn_layers": ("decoder", "MichalGeyer/pnp-diffusers pnp_utils.py: register_attention_control_efficient "
                                   "res_dict {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}"),
        "feature_block": ("auto", "MichalGeyer/pnp-diffusers pnp_utils.py: register_conv_control_efficient "
                                  "up_blocks[1].resnets[1]"),
        "inversion_prompt": ("", "MichalGeyer/pnp-diffusers preprocess.py: --inversion_prompt default ''"),
        "inversion_steps": (999, "MichalGeyer/pnp-diffusers preprocess.py: --steps default 999"),
        "negative_prompt": ("ugly, blurry, black, low res, unrealistic",
                            "MichalGeyer/pnp-diffusers config_pnp.yaml: negative_prompt"),
        "num_inference_steps": (50, "MichalGeyer/pnp-diffusers config_pnp.yaml: n_timesteps: 50"),
        "guidance_scale": (7.5, "MichalGeyer/pnp-diffusers config_pnp.yaml: guidance_scale: 7.5"),
    },
    **{f"sdedit_{s}": {
        "strength": (s, f"Liu et al. Table 5 row 'SDEdit ({s})'; diffusers pipeline_stable_diffusion_img2img.py "
                        "get_timesteps"),
        "num_inference_steps": (50, "diffusers StableDiffusionImg2ImgPipeline.__call__: num_inference_steps=50"),
        "guidance_scale": (7.5, "diffusers StableDiffusionImg2ImgPipeline.__call__: guidance_scale=7.5"),
    } for s in (0.5, 0.75)},
    "diffedit": {
        "mask_encode_strength": (0.5, DIFFEDIT + "generate_mask: "
                                      "mask_encode_strength=0.5"),
        "num_maps_per_mask": (10, DIFFEDIT + "generate_mask: num_maps_per_mask=10"),
        "mask_thresholding_ratio": (3.0, DIFFEDIT + "generate_mask: "
                                         "mask_thresholding_ratio=3.0"),
        "inpaint_strength": (0.8, DIFFEDIT + "invert, __call__: inpaint_strength=0.8"),
        "inversion_guidance_scale": (7.5, DIFFEDIT + "invert: guidance_scale=7.5"),
        "blend_latent": ("pre_step", DIFFEDIT + "__call__: image_latents[i] "
                                     "after step i"),
        "num_inference_steps": (50, DIFFEDIT + "__call__: num_inference_steps=50"),
        "guidance_scale": (7.5, DIFFEDIT + "__call__: guidance_scale=7.5"),
    },
    "pix2pix_zero": {
        "cross_attention_guidance_amount.real": (0.1, P2PZ + "edit_real.py: --xa_guidance 0.1"),
        "cross_attention_guidance_amount.generated": (0.15, P2PZ + "edit_synthetic.py: "
                                                            "--xa_guidance 0.15"),
        "real_negative_prompt": ("caption", P2PZ + "edit_real.py: negative_prompt=prompt_str"),
        "inversion_schedule": ("official", P2PZ + "utils/ddim_inv.py: timesteps.flip(0)[1:-1], "
                                           "utils/scheduler.py step(reverse=True)"),
        "noise_regularization.lambda_auto_corr": (20.0, P2PZ + "utils/ddim_inv.py: lambda_ac=20.0"),
        "noise_regularization.lambda_kl": (20.0, P2PZ + "utils/ddim_inv.py: lambda_kl=20.0"),
        "noise_regularization.num_reg_steps": (5, P2PZ + "utils/ddim_inv.py: num_reg_steps=5"),
        "noise_regularization.num_auto_corr_rolls": (5, P2PZ + "utils/ddim_inv.py: "
                                                        "num_ac_rolls=5"),
        "num_inference_steps": (50, P2PZ + "edit_real.py: --num_ddim_steps 50"),
        "guidance_scale": (5.0, P2PZ + "edit_real.py: --negative_guidance_scale 5.0"),
    },
    "shape_guided": {
        "cross_attn_scale": (2.5, "shape-guided-diffusion shape_guided_diffusion.py: cross_attn_schedule=2.5"),
        "self_attn_scale": (1.0, "shape-guided-diffusion shape_guided_diffusion.py: self_attn_schedule=1.0"),
        "inversion": ("inside_outside", "shape-guided-diffusion shape_guided_diffusion.py: run_inversion=True with "
                                        "run_cross/self_attention_mask"),
        "num_inference_steps": (50, "shape-guided-diffusion shape_guided_diffusion.py: steps=50"),
        "guidance_scale": (4.5, "shape-guided-diffusion shape_guided_diffusion.py: guidance_scale=3.5 in "
                                "ε_c + 3.5·(ε_c − ε_u) = CFG 1 + 3.5"),
    },
    "instructpix2pix": {
        "model": ("timbrooks/instruct-pix2pix", "timbrooks/instruct-pix2pix edit_cli.py: the released checkpoint "
                                                "(its diffusers port)"),
        "image_guidance_scale": (1.5, "timbrooks/instruct-pix2pix edit_cli.py: --cfg-image 1.5"),
        "num_inference_steps": (100, "timbrooks/instruct-pix2pix edit_cli.py: --steps 100"),
        "guidance_scale": (7.5, "timbrooks/instruct-pix2pix edit_cli.py: --cfg-text 7.5"),
    },
}

# method → {setting: why it is ours}
OURS = {
    "p2p": {"refine": "the official code leaves replace vs refine to the user; our rule: replace for equal word counts",
            "local_blend.enabled": "off by default (stable notebook); on in the null-text example",
            "local_blend.words": "null = the words that change (a benchmark has no hand-picked words)",
            "reweight.enabled": "off by default (stable notebook); on in the null-text example",
            "reweight.words": "null = the target words that change (the example's 'tiger')"},
    "pnp": {"inversion_cache": "a cache of the 999-step inversion per image (the official code saves it to disk too)"},
    "pix2pix_zero": {"direction": "banks: our small template sentence banks (official: ~1000 LLM sentences)",
                     "sentence_banks": "where our banks are", "missing_bank": "pairs without banks",
                     "source_sentences": "direction=sentences only", "target_sentences": "direction=sentences only"},
    "shape_guided": {"mask_source": "the official code takes a given mask; ours may derive it from attention",
                     "mask_threshold": "ours (attention mask)", "mask_resolution_divisor": "ours (attention mask)"},
    "instructpix2pix": {"instruction": "benchmarks give prompt pairs; the instruction is filled from them",
                        "instruction_fallback": "ours (see instruction)",
                        "source_num_inference_steps": "generated pairs: the base model makes the source",
                        "source_guidance_scale": "generated pairs: the base model makes the source",
                        "dtype": "the run's dtype"},
}
NOT_SETTINGS = {"name", "_target_", "_partial_"}


def flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def method_settings(compose_cfg, name: str) -> dict:
    cfg = compose_cfg(f"method={name}")  # the tiny model: SD-1.x settings (configs/model_settings/sd1x.yaml)
    return flat({k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in NOT_SETTINGS})


@pytest.mark.parametrize("method", sorted(OFFICIAL))
def test_method_defaults_are_the_official_values(compose_cfg, method):
    settings = method_settings(compose_cfg, method)
    for key, (value, source) in OFFICIAL[method].items():
        assert key in settings, f"{method}.{key} ({source}) is not a setting of configs/method/{method}.yaml"
        assert settings[key] == value, f"{method}.{key} = {settings[key]!r}, official {value!r} ({source})"
    unlisted = sorted(set(settings) - set(OFFICIAL[method]) - set(OURS.get(method, {})))
    assert not unlisted, f"{method}: settings neither official nor named as ours: {unlisted}"


def test_every_method_config_is_in_the_table():
    from .conftest import ROOT

    assert {p.stem for p in (ROOT / "configs" / "method").glob("*.yaml")} == set(OFFICIAL)


# --- step cut-offs --------------------------------------------------------------------------------------------
def truncated(fraction: float, n: int) -> int:
    """The official rule of FPE, P2P's self steps, PnP: int(f·N) steps."""
    return int(fraction * n)


def p2p_cross(fraction: float, n: int) -> int:
    """P2P's cross steps (get_time_words_attention_alpha): α has N + 1 rows, int(f·(N+1)) of them active."""
    return int(fraction * (n + 1))


RULES = (lambda f, n: round(f * n), truncated, p2p_cross)  # the rules a port might use


def separating_steps(fraction: float, rule) -> int:
    """The smallest step count N ≥ 4 at which ``rule`` gives another cut-off than the other rules of
    :data:`RULES` (round(f·N), int(f·N), int(f·(N+1))) and than ``rule`` with f ± 0.1: a test at steps cut − 1
    and cut then fails for any of those rules and for a fraction one value off."""
    for n in range(4, 60):
        cut = rule(fraction, n)
        others = [other(fraction, n) for other in RULES if other is not rule]
        others += [rule(f, n) for f in (round(fraction - 0.1, 10), round(fraction + 0.1, 10)) if 0 <= f <= 1]
        if 0 < cut < n and cut not in others:
            return n
    raise AssertionError(f"no step count separates the rule for {fraction}")


def test_separating_steps():
    # 0.8 at N = 7: int 5; round(5.6) = 6, int(0.8·8) = 6, int(0.7·7) = 4, int(0.9·7) = 6
    assert separating_steps(0.8, truncated) == 7 and truncated(0.8, 7) == 5
    # P2P's cross 0.8 at N = 8: int(0.8·9) = 7; int(6.4) = round(6.4) = 6, int(0.7·9) = 6, int(0.9·9) = 8
    assert separating_steps(0.8, p2p_cross) == 8 and p2p_cross(0.8, 8) == 7
