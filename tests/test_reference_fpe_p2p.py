"""Reference tests: FPE and P2P against an independent re-implementation of the authors' code.

One UNet call of the tiny SD-layout model is computed twice: with our hooks, and with a test-local
processor that does what the official ``register_attention_control`` + controller do (explicit
per-(batch·head) maps ``softmax(q kᵀ·scale)``, the controller edits the conditional half, ``maps @ v``).
The logic follows the official sources as recorded in the fidelity notes: FPE =
alibaba/EasyNLP ``diffusion/FreePromptEditing/Freeprompt/freeprompt.py``; P2P =
google/prompt-to-prompt ``AttentionControlEdit`` / ``AttentionReplace`` / ``AttentionRefine``
(notebooks) with ``seq_aligner.py``. Also hand-worked examples of the seq_aligner mappers."""

import pytest
import torch
from omegaconf import OmegaConf

from editing.baselines.p2p import LocalBlend, make_equalizer, make_local_blend, p2p_hooks, per_pair_kind
from editing.fpe import fpe_real, self_replace_hooks
from editing.inversion import ddim_invert
from editing.seq_aligner import align_target_tokens, alignment_scores, refinement_mapper, replacement_mapper
from editing.two_branch import model_layers, replacement_edit
from sdattn.errors import UserError
from sdattn.hooks import BatchLayout, HookSet, installed
from sdattn.layers import select_layers
from sdattn.sampling import ddim_scheduler, encode_image, encode_prompts, initial_latents, latent_size

from .conftest import ROOT
from .test_reference_settings import OFFICIAL, p2p_cross, separating_steps, truncated

STEPS = 10  # sampling steps of the one-call comparisons that are not about a step cut-off
OFFICIAL_TOKENS_AT_512 = {"official": 32**2, "stable": 16**2}  # self maps replaced where queries ≤ this at 512 px
OFFICIAL_LATENT_SIDE = 64  # SD 1.x at 512 px
METHODS = ROOT / "configs" / "method"
FPE_YAML, P2P_YAML = OmegaConf.load(METHODS / "fpe.yaml"), OmegaConf.load(METHODS / "p2p.yaml")


def official(method: str, key: str):
    return OFFICIAL[method][key][0]


# --- the official controllers, re-implemented -------------------------------------------------------------
class OfficialFPE:
    """freeprompt.py SelfAttentionControlEdit: cond half only; self maps with q ≤ limit, step < int(frac·T)."""

    def __init__(self, step: int, num_steps: int, limit: int, frac: float):
        self.step, self.limit, self.end = step, limit, int(frac * num_steps)

    def __call__(self, maps: torch.Tensor, is_cross: bool, name: str = "") -> torch.Tensor:  # (2·B·H, q, k)
        half = maps.shape[0] // 2
        maps[half:] = self.forward(maps[half:], is_cross)
        return maps

    def forward(self, maps, is_cross):
        if is_cross or not 0 <= self.step < self.end:
            return maps
        m = maps.reshape(2, -1, *maps.shape[1:])  # (prompts, heads, q, k)
        if m[1:].shape[2] <= self.limit:
            m[1:] = m[0].unsqueeze(0).expand_as(m[1:])
        return m.reshape(maps.shape)


class OfficialP2P:
    """AttentionControlEdit.forward with AttentionReplace (einsum with the mapper) or AttentionRefine
    (index by mapper, blend by alphas), optionally wrapped by AttentionReweight (× equalizer); cross α_t from
    get_time_words_attention_alpha (T+1 rows), self steps int(self·T)."""

    def __init__(self, step: int, num_steps: int, limit: int, mode: str, mapper, alphas=None, *, cross: float,
                 self_: float, equalizer=None):
        self.step, self.limit, self.mode, self.mapper, self.alphas = step, limit, mode, mapper, alphas
        self.alpha_t = 1.0 if self.step < int(cross * (num_steps + 1)) else 0.0
        self.self_end = int(self_ * num_steps)
        self.equalizer = equalizer

    def __call__(self, maps, is_cross, name: str = ""):
        half = maps.shape[0] // 2
        maps[half:] = self.forward(maps[half:], is_cross)
        return maps

    def forward(self, maps, is_cross):
        if not (is_cross or 0 <= self.step < self.self_end):
            return maps
        m = maps.reshape(2, -1, *maps.shape[1:])
        base, repl = m[0], m[1:]
        if is_cross:
            if self.mode == "replace":
                new = torch.einsum("hpw,bwn->bhpn", base, self.mapper[None])
            else:
                new = base[:, :, self.mapper[None]].permute(2, 0, 1, 3) * self.alphas + repl * (1 - self.alphas)
            if self.equalizer is not None:
                new = new * self.equalizer[None, None, None, :]
            m[1:] = new * self.alpha_t + (1 - self.alpha_t) * repl
        elif repl.shape[2] <= self.limit:
            m[1:] = base.unsqueeze(0).expand_as(repl)
        return m.reshape(maps.shape)


class OfficialProcessor:
    """The official CrossAttention forward: explicit maps, the controller edits them, maps @ v."""

    def __init__(self, controller, name: str = ""):
        self.controller, self.name = controller, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        maps = (torch.einsum("bid,bjd->bij", q, k) * attn.scale).softmax(-1)
        maps = self.controller(maps, is_cross, self.name)
        out = attn.batch_to_head_dim(torch.einsum("bij,bjd->bid", maps, v))
        return attn.to_out[1](attn.to_out[0](out))


def official_processors(unet, controller) -> dict:
    return {name: OfficialProcessor(controller, name) for name in unet.attn_processors}


# --- one UNet call, ours vs the reference ------------------------------------------------------------------
def one_call_inputs(pipe, source: str, target: str, step: int, num_steps: int):
    sched = ddim_scheduler(pipe)
    sched.set_timesteps(num_steps)
    h, w = latent_size(pipe)
    z = torch.randn((2, pipe.unet.config.in_channels, h, w), generator=torch.Generator().manual_seed(7))
    context = torch.cat([encode_prompts(pipe, ["", ""]), encode_prompts(pipe, [source, target])])
    return torch.cat([z, z]), sched.timesteps[step], context  # rows [uncond src, uncond tgt, cond src, cond tgt]


@torch.no_grad()
def ours_vs_official(pipe, hooks: dict, controller, source: str, target: str, step: int, num_steps: int = STEPS):
    x, t, context = one_call_inputs(pipe, source, target, step, num_steps)
    plain = pipe.unet(x, t, encoder_hidden_states=context).sample
    with HookSet(pipe.unet, list(hooks), lambda layer, state: hooks[layer](layer, state)) as hookset:
        hookset.on_step_begin(step, int(t), num_steps, BatchLayout(2))
        ours = pipe.unet(x, t, encoder_hidden_states=context).sample
    with installed(pipe.unet, official_processors(pipe.unet, controller)):
        ref = pipe.unet(x, t, encoder_hidden_states=context).sample
    return ours, ref, plain


def official_limit(pipe, preset: str = "official") -> int:
    """The official query-token limit of self replacement at a 64² latent, at this model's latent size."""
    h, w = latent_size(pipe)
    return OFFICIAL_TOKENS_AT_512[preset] * h * w // OFFICIAL_LATENT_SIDE**2


def cut_off(fraction: float, rule) -> tuple[int, int]:
    """(N, cut): a step count at which the rule's cut-off differs from the other rules and neighbouring values."""
    n = separating_steps(fraction, rule)
    return n, rule(fraction, n)


@pytest.mark.parametrize("last_active", [True, False])
def test_fpe_cut_off_matches_the_official_controller(tiny_pipe, last_active):
    """The YAML's self_replace_steps against the official .8 with int(0.8·N), at the last active step and
    the first inactive one (N = 7: steps 4 and 5)."""
    src, tgt = "a white car", "a red car"
    n, cut = cut_off(official("fpe", "self_replace_steps"), truncated)
    step = cut - 1 if last_active else cut
    hooks = self_replace_hooks(tiny_pipe, "official", FPE_YAML.self_replace_steps, n)
    assert [x.index for x in hooks] == list(range(3, 14))  # SD 1.5 layers 3-13
    controller = OfficialFPE(step, n, official_limit(tiny_pipe), official("fpe", "self_replace_steps"))
    ours, ref, plain = ours_vs_official(tiny_pipe, hooks, controller, src, tgt, step, n)
    assert (ours - ref).abs().max() <= 1e-5
    assert ((ours - plain).abs().max() > 1e-3) == last_active
    assert (ours[:3] - plain[:3]).abs().max() <= 1e-5  # the uncond rows and the source are untouched


# Mappers worked out by hand for the tiny model's tokenizer (independent of editing.seq_aligner): it keeps
# "a", "cat", "sitting", "on", "chair", "red", "blue", "car" whole and spells "mat" and "big" letter by letter.
def hand_replace(entries: dict, tail_from: int, n: int = 77) -> torch.Tensor:
    """A replacement mapper: ``entries`` {(source, target): weight}, then the official tail M[q, q], q ≥ tail_from."""
    m = torch.zeros(n, n)
    for (i, j), w in entries.items():
        m[i, j] = w
    for q in range(tail_from, n):
        m[q, q] = 1.0
    return m


HAND_REPLACE = {
    # BOS a cat sitting on chair EOS (0-6) → BOS a m a t sitting on chair EOS (0-8): "cat" → m, a, t with 1/3 each;
    # after the changed word the official mapper goes on at the target's position 5 on the diagonal, so target
    # "sitting" (5) reads source "chair" (5) — the official misalignment
    ("a cat sitting on chair", "a mat sitting on chair"): hand_replace(
        {(0, 0): 1, (1, 1): 1, (2, 2): 1 / 3, (2, 3): 1 / 3, (2, 4): 1 / 3}, tail_from=5),
    # one token each: "red" → "blue" at position 2, the identity everywhere
    ("a red car", "a blue car"): hand_replace({}, tail_from=0),
}
# BOS a cat sitting on chair EOS → BOS a b i g cat sitting on chair EOS: "b", "i", "g" have no source token
HAND_REFINE = {("a cat sitting on chair", "a big cat sitting on chair"): (
    torch.tensor([0, 1, -1, -1, -1, 2, 3, 4, 5, 6] + list(range(10, 77))),
    torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0] + [1.0] * 72))}
# the null-text example's re-weighting on the changed target word "mat" (its tokens 2, 3, 4) × the official 2
HAND_EQUALIZER = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0] + [1.0] * 72)


def test_our_mappers_are_the_hand_worked_ones(tiny_pipe):
    tok = tiny_pipe.tokenizer
    for (src, tgt), want in HAND_REPLACE.items():
        torch.testing.assert_close(replacement_mapper(src, tgt, tok, 77), want, rtol=0, atol=0)
    for (src, tgt), (mapper, alphas) in HAND_REFINE.items():
        got = refinement_mapper(src, tgt, tok, 77)
        assert got[0].tolist() == mapper.tolist() and got[1].tolist() == alphas.tolist()
    src, tgt = "a cat sitting on chair", "a mat sitting on chair"
    values = official("p2p", "reweight.values")
    torch.testing.assert_close(make_equalizer(tok, src, tgt, words=None, values=values), HAND_EQUALIZER)


def p2p_controller(pipe, source, target, mode, step, num_steps, kind="generated", equalizer=None):
    """The official controller with the official settings of ``kind`` and the hand-worked mappers."""
    limit = official_limit(pipe, official("p2p", f"self_layers.{kind}"))
    settings = dict(cross=official("p2p", "cross_replace_steps"), self_=official("p2p", f"self_replace_steps.{kind}"),
                    equalizer=equalizer)
    if mode == "replace":
        return OfficialP2P(step, num_steps, limit, mode, HAND_REPLACE[source, target], **settings)
    mapper, alphas = HAND_REFINE[source, target]
    return OfficialP2P(step, num_steps, limit, mode, mapper, alphas.reshape(1, 1, 1, -1), **settings)


def our_p2p_hooks(pipe, source, target, num_steps, kind="generated", equalizer=None):
    """Our hooks with the settings of configs/method/p2p.yaml for ``kind``."""
    return p2p_hooks(pipe, source, target, num_steps, cross_replace_steps=P2P_YAML.cross_replace_steps,
                     self_replace_steps=per_pair_kind(P2P_YAML.self_replace_steps, kind),
                     cross_layers=P2P_YAML.cross_layers, self_layers=per_pair_kind(P2P_YAML.self_layers, kind),
                     refine=P2P_YAML.refine, equalizer=equalizer)


P2P_CASES = [
    # replace, 1 → 3 tokens: the 1/3 split and the tail quirk; step 2 with self replacement, 6 cross only
    ("a cat sitting on chair", "a mat sitting on chair", "replace", 2),
    ("a cat sitting on chair", "a mat sitting on chair", "replace", 6),
    ("a red car", "a blue car", "replace", 1),
    ("a cat sitting on chair", "a big cat sitting on chair", "refine", 2),  # "big": 3 tokens, no source
]


@pytest.mark.parametrize("source,target,mode,step", P2P_CASES)
def test_p2p_one_unet_call_matches_the_official_controller(tiny_pipe, source, target, mode, step):
    hooks, used = our_p2p_hooks(tiny_pipe, source, target, STEPS)
    assert used == mode
    controller = p2p_controller(tiny_pipe, source, target, mode, step, STEPS)
    ours, ref, plain = ours_vs_official(tiny_pipe, hooks, controller, source, target, step)
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours[3] - plain[3]).abs().max() > 1e-3  # the call did edit the target
    assert (ours[:3] - plain[:3]).abs().max() <= 1e-5


def test_p2p_reweight_matches_the_official_attention_reweight(tiny_pipe):
    """AttentionReweight(controller=AttentionReplace) with get_equalizer on the changed word × 2 (the official
    null-text example's eq_params), from configs/method/p2p.yaml's reweight values."""
    src, tgt = "a cat sitting on chair", "a mat sitting on chair"
    reweight = {k: v for k, v in OmegaConf.to_container(P2P_YAML.reweight).items() if k != "enabled"}
    eq = make_equalizer(tiny_pipe.tokenizer, src, tgt, **reweight)
    hooks, _ = our_p2p_hooks(tiny_pipe, src, tgt, STEPS, equalizer=eq)
    controller = p2p_controller(tiny_pipe, src, tgt, "replace", 2, STEPS, equalizer=HAND_EQUALIZER)
    ours, ref, plain = ours_vs_official(tiny_pipe, hooks, controller, src, tgt, 2)
    assert (ours - ref).abs().max() <= 1e-5
    unweighted, _ = our_p2p_hooks(tiny_pipe, src, tgt, STEPS)
    assert (ours_vs_official(tiny_pipe, unweighted, controller, src, tgt, 2)[0] - ours).abs().max() > 1e-4


P2P_CUTS = [  # (which steps, pair kind): the official fraction and its rule
    ("cross", "generated", "cross_replace_steps", p2p_cross),
    ("self", "generated", "self_replace_steps.generated", truncated),
    ("self", "real", "self_replace_steps.real", truncated),
]


@pytest.mark.parametrize("last_active", [True, False])
@pytest.mark.parametrize("which,kind,key,rule", P2P_CUTS)
def test_p2p_cut_offs_match_the_official_controller(tiny_pipe, which, kind, key, rule, last_active):
    """The YAML's cross / self fractions against the official ones, at the last active step and the first
    inactive one of each (cross 0.8 over N + 1 rows at N = 8: steps 6, 7; self 0.4 at N = 9: 2, 3; self 0.5 at
    N = 7: 2, 3)."""
    src, tgt = "a cat sitting on chair", "a mat sitting on chair"
    n, cut = cut_off(official("p2p", key), rule)
    step = cut - 1 if last_active else cut
    hooks, _ = our_p2p_hooks(tiny_pipe, src, tgt, n, kind)
    controller = p2p_controller(tiny_pipe, src, tgt, "replace", step, n, kind)
    ours, ref, plain = ours_vs_official(tiny_pipe, hooks, controller, src, tgt, step, n)
    assert (ours - ref).abs().max() <= 1e-5
    if which == "cross":  # self is off by then: the target is edited only while the cross maps are
        assert ((ours[3] - plain[3]).abs().max() > 1e-3) == last_active
    else:  # the self maps make a difference at this step (cross maps are replaced at both)
        controller.self_end = 0
        without_self = ours_vs_official(tiny_pipe, hooks, controller, src, tgt, step, n)[1]
        assert ((ref - without_self).abs().max() > 1e-4) == last_active


# --- seq_aligner: hand-worked examples of the official behaviour ------------------------------------------
class SplitTokenizer:
    """A word tokenizer (BOS/EOS added by encode, as CLIP's) that splits "hippopotamus" into 2 tokens."""

    SPLITS = {"hippopotamus": ["hippo", "potamus"]}

    def __init__(self):
        self.vocab = ["<s>", "</s>"]

    def encode(self, text: str) -> list[int]:
        pieces = [p for w in text.split(" ") for p in self.SPLITS.get(w, [w])]
        for p in pieces:
            if p not in self.vocab:
                self.vocab.append(p)
        return [0, *(self.vocab.index(p) for p in pieces), 1]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


def expected(entries: dict, n: int = 77) -> torch.Tensor:
    m = torch.zeros(n, n)
    for (i, j), value in entries.items():
        m[i, j] = value
    return m


def test_replacement_mapper_splits_a_word_by_1_over_target_tokens():
    # "a cat" → "a hippopotamus": positions BOS 0, a 1, cat 2 | BOS 0, a 1, hippo 2, potamus 3, EOS 4
    m = replacement_mapper("a cat", "a hippopotamus", SplitTokenizer(), 77)
    want = {(0, 0): 1, (1, 1): 1, (2, 2): 0.5, (2, 3): 0.5} | {(k, k): 1 for k in range(4, 77)}
    # Official quirk (seq_aligner.get_replacement_mapper_): after the last changed word it sets M[j, j], not
    # M[i, j], so target positions ≥ 4 read the source at the *same* position: the source EOS (3) is
    # never read and the target's EOS (4) takes the source's first padding token.
    torch.testing.assert_close(m, expected(want), rtol=0, atol=0)


def test_replacement_mapper_tail_is_misaligned_after_a_longer_word():
    m = replacement_mapper("a cat sitting on mat", "a hippopotamus sitting on mat", SplitTokenizer(), 77)
    assert m[2, 2] == m[2, 3] == 0.5 and m[:, 2].sum() == m[:, 3].sum() == 0.5
    assert m[4, 4] == 1 and m[3, 4] == 0  # target "sitting" (4) ← source "on" (4): the official misalignment


def test_replacement_mapper_sums_several_source_tokens_into_one():
    m = replacement_mapper("a hippopotamus sitting", "a cat sitting", SplitTokenizer(), 77)
    assert m[2, 2] == m[3, 2] == 1  # ratio 1/len(target) = 1: target "cat" gets the sum of both maps
    assert m[3, 3] == 1 and m[4, 3] == 0  # tail by target position (quirk): "sitting" (3) ← "potamus" (3)
    assert m[:, 76].sum() == 0 and m[:, 75].sum() == 1  # the last Δ = 1 target column stays empty


def test_replacement_mapper_needs_equal_word_counts():
    with pytest.raises(UserError, match="same number of words"):
        replacement_mapper("a cat", "a big cat", SplitTokenizer(), 77)


def test_refinement_mapper_inserted_word():
    mapper, alphas = refinement_mapper("a cat sitting on mat", "a big cat sitting on mat", SplitTokenizer(), 77)
    assert mapper[:10].tolist() == [0, 1, -1, 2, 3, 4, 5, 6, 8, 9]  # padding after the target EOS (7) is identity
    assert alphas.tolist() == [1, 1, 0] + [1] * 74


def test_alignment_tie_order_is_target_gap_then_source_gap_then_pair():
    # x = [1, 2], y = [2, 1]: at (2, 2) a target gap and a source gap tie at score 1; the target gap wins →
    # y[1] has no source, y[0] ← x[1]
    assert alignment_scores([1, 2], [2, 1]) == [[0, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert align_target_tokens([1, 2], [2, 1]) == [1, -1]
    assert align_target_tokens([5, 6, 7], [5, 7]) == [0, 2]  # a source token dropped


# --- LocalBlend ---------------------------------------------------------------------------------------------
def reference_local_blend(x_t: torch.Tensor, layer_maps: list[torch.Tensor], words: torch.Tensor,
                          threshold: float) -> torch.Tensor:
    """LocalBlend from its definition (P2P ``null_text_w_ptp.ipynb``, after ``start_blend``). x_t (2, C, h, w)
    = [source, target]; ``layer_maps``: per blend layer the maps (2·heads, side², L) summed over the steps;
    ``words`` (2, L): 1 on each prompt's blend-word tokens. Per prompt: the blend words' share of attention,
    averaged over every head of every layer; grown by a 3×3 max filter; nearest-upsampled to the latent;
    relative to its maximum; above ``threshold`` = the word's region. The target keeps its latent inside the
    source's region or its own, the source's elsewhere."""
    heads = torch.cat([m.unflatten(0, (2, -1)) for m in layer_maps], 1)  # (2, heads·layers, side², L)
    share = (heads * words[:, None, None, :]).sum(-1).mean(1)  # (2, side²)
    side = round(share.shape[-1] ** 0.5)
    grown = torch.nn.functional.max_pool2d(share.reshape(2, 1, side, side), 3, stride=1, padding=1)
    full = torch.nn.functional.interpolate(grown, size=x_t.shape[2:], mode="nearest")
    region = full / full.amax((1, 2, 3), keepdim=True) > threshold  # (2, 1, h, w)
    keep = (region | region[:1]).to(x_t)
    return x_t[:1] + keep * (x_t - x_t[:1])


def test_local_blend_matches_the_official_mask_and_blend(tiny_pipe):
    src, tgt = "a cat sitting on chair", "a mat sitting on chair"
    blend = make_local_blend(tiny_pipe, src, tgt, STEPS, **local_blend_settings())
    h, _ = latent_size(tiny_pipe)
    assert [x.height for x in blend.layers] == [h // 4] * 5  # down ×2, up ×3
    assert blend.steps == set(range(2, 10))  # blending from step int(0.2·10) on
    assert blend.alphas[0].nonzero().flatten().tolist() == [2] and blend.alphas[1].nonzero().flatten().tolist() == [
        2, 3, 4]
    g = torch.Generator().manual_seed(3)
    stored = {x.label: [] for x in blend.layers}
    for _ in range(2):  # two steps: the maps are summed
        for x in blend.layers:
            # word maps rising steeply over the grid: after pooling and ÷ max they span (0, 1], so a threshold
            # 0.1 off moves the mask's border
            ramp = (torch.arange(x.tokens, dtype=torch.float32) / (x.tokens - 1)) ** 3  # (N,)
            probs = torch.rand((2, 8, x.tokens, 77), generator=g).softmax(-1) * 0.01
            probs[..., 2:5] += ramp[:, None]
            blend.recorder.add(LocalBlend.MAPS, x, probs)
            stored[x.label].append(probs)
    x_t = torch.randn((2, 4, h, h), generator=g)
    assert blend.on_step_end(1, 0, x_t) is None  # counter 2 ≤ start (the official ``counter > start_blend``)
    ours = blend.on_step_end(2, 0, x_t)
    summed = [sum(stored[x.label]).reshape(16, x.tokens, 77) for x in blend.layers]
    ref = reference_local_blend(x_t, summed, BLEND_WORDS, official("p2p", "local_blend.threshold"))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert 0 < (ours[1] != x_t[1]).float().mean() < 1  # part of the target was reset to the source


def test_p2p_local_blend_option_runs_and_bounds(tiny_pipe, make_method):
    from evaluation.datasets import EditExample

    ex = EditExample("x", "a red car", "a blue car")
    plain = make_method("p2p", num_inference_steps=2)(tiny_pipe, ex, 5)
    none_kept = make_method("p2p", num_inference_steps=2, local_blend={"enabled": True, "threshold": 1.5,
                                                                           "start_blend": 0.0})
    src, edited = none_kept(tiny_pipe, ex, 5)
    torch.testing.assert_close(edited, src)  # empty mask: the target is the source after every step
    all_kept = make_method("p2p", num_inference_steps=2, local_blend={"enabled": True, "threshold": -1.0,
                                                                          "start_blend": 0.0})
    torch.testing.assert_close(all_kept(tiny_pipe, ex, 5)[1], plain[1])  # full mask: plain P2P
    with pytest.raises(UserError, match="no blend word"):
        make_method("p2p", num_inference_steps=2,
                    local_blend={"enabled": True, "words": ["dog", "cat"], "threshold": 0.3, "start_blend": 0.2})(
            tiny_pipe, ex, 5)


BLEND_PAIR = ("a cat sitting on chair", "a mat sitting on chair")
BLEND_WORDS = torch.zeros(2, 77)  # by hand: source "cat" at 2; target "mat" spelt m, a, t at 2, 3, 4
BLEND_WORDS[0, 2] = BLEND_WORDS[1, 2:5] = 1.0


def local_blend_settings() -> dict:
    return {k: v for k, v in OmegaConf.to_container(P2P_YAML.local_blend).items() if k != "enabled"}


@pytest.mark.parametrize("last_off", [True, False])
def test_local_blend_starts_at_the_official_step(tiny_pipe, last_off):
    """Official LocalBlend: ``counter += 1; if counter > int(start_blend·NUM_DDIM_STEPS)``: blended from the 0-based
    step int(0.2·N) on. The YAML's start_blend against the official 0.2 (N = 9: step 0 not, step 1 yes)."""
    n, start = cut_off(official("p2p", "local_blend.start_blend"), truncated)
    blend = make_local_blend(tiny_pipe, *BLEND_PAIR, n, **local_blend_settings())
    g = torch.Generator().manual_seed(0)
    for x in blend.layers:
        blend.recorder.add(LocalBlend.MAPS, x, torch.rand((2, 8, x.tokens, 77), generator=g).softmax(-1))
    h, w = latent_size(tiny_pipe)
    x_t = torch.randn((2, 4, h, w), generator=g)
    assert (blend.on_step_end(start - 1 if last_off else start, 0, x_t) is None) == last_off


class RecordingController:
    """The official AttentionStore under a controller: the conditional half of every cross map of the blend
    layers (those with ``tokens`` queries), after the controller edited it in place, summed over the calls."""

    def __init__(self, controller, tokens: int, store: dict):
        self.controller, self.tokens, self.store = controller, tokens, store

    def __call__(self, maps, is_cross, name):
        maps = self.controller(maps, is_cross, name)
        if is_cross and maps.shape[1] == self.tokens:
            half = maps.shape[0] // 2
            self.store[name] = self.store.get(name, 0) + maps[half:]
        return maps


@torch.no_grad()
def reference_blended_run(pipe, z_t: torch.Tensor, num_steps: int, threshold: float, start: int):
    """The official P2P loop (text2image_ldm_stable + diffusion_step) on BLEND_PAIR with LocalBlend: per step
    the UNet on [uncond ×2, source, target] through the official controller and the store, CFG, the DDIM step,
    then (from ``start`` on) LocalBlend on the maps stored so far. → (final latents (2, C, h, w), the store)."""
    h, w = latent_size(pipe)
    tokens = (h // 4) * (w // 4)  # the official down_cross[2:4] + up_cross[:3]: the 16² maps at a 64² latent
    sched = ddim_scheduler(pipe)
    sched.set_timesteps(num_steps)
    context = torch.cat([encode_prompts(pipe, ["", ""]), encode_prompts(pipe, list(BLEND_PAIR))])
    store: dict = {}
    z = z_t.repeat(2, 1, 1, 1)
    for i, t in enumerate(sched.timesteps):
        controller = RecordingController(p2p_controller(pipe, *BLEND_PAIR, "replace", i, num_steps), tokens, store)
        with installed(pipe.unet, official_processors(pipe.unet, controller)):
            eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.chunk(2)
        z = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, z).prev_sample
        if i >= start:
            z = reference_local_blend(z, list(store.values()), BLEND_WORDS, threshold)
    return z, store


def test_local_blend_maps_recorded_while_sampling_match_the_official_store(tiny_pipe):
    """P2P with LocalBlend on (p2p.yaml's threshold and start_blend) through a whole generated edit, against the
    official loop with the official settings (th .3, start int(0.2·N)): the maps our hooks handed the blend
    (conditional rows, the target's after the edit, summed over every step) and the blended latents."""
    n = 6
    blend = make_local_blend(tiny_pipe, *BLEND_PAIR, n, **local_blend_settings())
    hooks, _ = p2p_hooks(tiny_pipe, *BLEND_PAIR, n, cross_replace_steps=P2P_YAML.cross_replace_steps,
                         self_replace_steps=P2P_YAML.self_replace_steps.generated, cross_layers=P2P_YAML.cross_layers,
                         self_layers=P2P_YAML.self_layers.generated, refine=True, blend=blend)
    z_t = initial_latents(tiny_pipe, [11])
    with torch.no_grad():
        ours = replacement_edit(tiny_pipe, *BLEND_PAIR, z_t, hooks, n, 7.5, callbacks=[blend], progress=False)
    start = int(official("p2p", "local_blend.start_blend") * n)
    ref, store = reference_blended_run(tiny_pipe, z_t, n, official("p2p", "local_blend.threshold"), start)
    assert sorted(store) == sorted(x.name for x in blend.layers)
    for x in blend.layers:
        recorded = blend.recorder[LocalBlend.MAPS][x.label]  # (2, H, N, L) summed over the steps
        torch.testing.assert_close(recorded.flatten(0, 1), store[x.name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # 6 steps of SDPA vs explicit maps: ~2e-5


# --- FPE on a real image: the source row re-anchored -----------------------------------------------------------
@torch.no_grad()
def reference_fpe_real(pipe, trajectory, target: str, num_steps: int, anchor_offset: int = 1) -> torch.Tensor:
    """edit_real.ipynb through FreePromptPipeline.__call__(ref_intermediate_latents=latents_list): before step i
    the source row is ``latents_list[-1 - i]`` (``anchor_offset`` 1), then the UNet with the official FPE
    controller, CFG 7.5, the DDIM step. → the edited latent (1, C, h, w)."""
    sched = ddim_scheduler(pipe)
    sched.set_timesteps(num_steps)
    context = torch.cat([encode_prompts(pipe, ["", ""]), encode_prompts(pipe, ["", target])])
    frac = official("fpe", "self_replace_steps")
    z = trajectory[-1].repeat(2, 1, 1, 1)
    for i, t in enumerate(sched.timesteps):
        z = torch.cat([trajectory[-anchor_offset - i], z[1:]])
        controller = OfficialFPE(i, num_steps, official_limit(pipe), frac)
        with installed(pipe.unet, official_processors(pipe.unet, controller)):
            eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.chunk(2)
        z = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, z).prev_sample
    return z[1:]


def test_fpe_real_anchor_index_is_the_official_one(tiny_pipe):
    n, image = 4, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    traj = ddim_invert(tiny_pipe, encode_image(tiny_pipe, image), "", n, progress=False)
    ours = fpe_real(tiny_pipe, image, "a red car", "", "ddim", layers="official",
                    self_replace_steps=FPE_YAML.self_replace_steps, num_inference_steps=n, guidance_scale=7.5,
                    progress=False).latents["edited"]
    torch.testing.assert_close(ours, reference_fpe_real(tiny_pipe, traj, "a red car", n), rtol=1e-4, atol=1e-4)
    one_level_off = reference_fpe_real(tiny_pipe, traj, "a red car", n, anchor_offset=2)
    assert (ours - one_level_off).abs().max() > 1e-2  # the index is pinned: one level off shows


# --- null-text inversion --------------------------------------------------------------------------------------
def reference_null_text(pipe, trajectory: list[torch.Tensor], prompt: str, guidance: float, inner_steps: int,
                        early_stop: float) -> list[torch.Tensor]:
    """Null-text inversion (Mokady et al.) written from its definition, with the official schedule
    (``NullInversion`` in null_text_w_ptp.ipynb: per step i a fresh Adam at lr 1e-2·(1 − i/100), at most
    ``inner_steps`` updates, stop once the loss before an update is < early_stop + 2e-5·i) and the notebook's
    own DDIM step (ᾱ_prev = ᾱ[t − 1000/N], the final ᾱ below 0). Returns the null embedding of every step."""
    sched = ddim_scheduler(pipe)
    n = len(trajectory) - 1
    sched.set_timesteps(n)
    gap = sched.config.num_train_timesteps // n

    def next_level(eps, t, z):  # one DDIM step from level t down to t − gap
        a = sched.alphas_cumprod[t]
        a_next = sched.alphas_cumprod[t - gap] if t >= gap else sched.final_alpha_cumprod
        x0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
        return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps

    def eps(z, t, text):
        return pipe.unet(z, t, encoder_hidden_states=text).sample

    def guided(z, t, null, eps_text):
        eps_null = eps(z, t, null)
        return eps_null + guidance * (eps_text - eps_null)

    text, null = encode_prompts(pipe, [prompt]), encode_prompts(pipe, [""])
    z, nulls = trajectory[-1], []
    for i, t in enumerate(sched.timesteps):
        goal = trajectory[n - 1 - i]  # the inversion latent this step must reach
        with torch.no_grad():
            eps_text = eps(z, t, text)
        null = null.detach().clone().requires_grad_(True)  # Adam updates it in place: not the stored ones
        adam = torch.optim.Adam([null], lr=1e-2 * (1.0 - i / 100.0))
        for _ in range(inner_steps):
            loss = torch.nn.functional.mse_loss(next_level(guided(z, t, null, eps_text), t, z), goal)
            adam.zero_grad()
            loss.backward()
            adam.step()
            if loss.item() < early_stop + i * 2e-5:
                break
        null = null.detach()
        nulls.append(null)
        with torch.no_grad():
            z = next_level(guided(z, t, null, eps_text), t, z)
    pipe.unet.zero_grad(set_to_none=True)
    return nulls


def test_null_text_inversion_matches_the_official_loop(tiny_pipe):
    from editing.inversion import ddim_invert, null_text_inversion, null_text_schedule

    steps, prompt = 2, "a white car"
    schedule = null_text_schedule()
    assert schedule == {"inner_steps": 10, "lr": 1e-2, "lr_decay": 1e-2, "early_stop": 1e-5, "early_stop_growth": 2e-5}
    z0 = torch.randn((1, 4, *latent_size(tiny_pipe)), generator=torch.Generator().manual_seed(1))
    traj = ddim_invert(tiny_pipe, z0, prompt, steps, progress=False)
    ours = null_text_inversion(tiny_pipe, traj, prompt, 7.5, progress=False, inner_steps=3)
    ref = reference_null_text(tiny_pipe, traj, prompt, 7.5, 3, 1e-5)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # a constant lr (no decay) is off by 3e-4
    # the early stop at early_stop + growth·i: a huge threshold stops after one update per step
    once = null_text_inversion(tiny_pipe, traj, prompt, 7.5, progress=False, inner_steps=3, early_stop=1e9)
    ref_once = reference_null_text(tiny_pipe, traj, prompt, 7.5, 1, 1e-5)
    torch.testing.assert_close(once[-1], ref_once[-1], rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="not a null-text setting"):
        null_text_inversion(tiny_pipe, traj, prompt, 7.5, progress=False, inner_step=2)


def test_p2p_self_settings_follow_the_two_official_notebooks(tiny_pipe):
    layers = model_layers(tiny_pipe)
    assert [x.index for x in select_layers(layers, "stable")] == list(range(5, 11))  # SD: ≤ 16² at 512 px
    assert [x.index for x in select_layers(layers, "official")] == list(range(3, 14))  # ≤ 32²
    setting = {"generated": 0.4, "real": 0.5}
    assert per_pair_kind(setting, "generated") == 0.4 and per_pair_kind(setting, "real") == 0.5
    assert per_pair_kind(0.3, "real") == 0.3
    with pytest.raises(UserError, match="exactly the keys"):
        per_pair_kind({"generated": 0.4}, "real")
