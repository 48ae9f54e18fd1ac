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

from editing.baselines.p2p import LocalBlend, make_local_blend, p2p_hooks, per_pair_kind
from editing.fpe import self_replace_hooks
from editing.seq_aligner import aligned_sources, global_align, refinement_mapper, replacement_mapper
from editing.two_branch import model_layers
from sdattn.errors import UserError
from sdattn.hooks import BatchLayout, HookSet, installed
from sdattn.layers import select_layers
from sdattn.sampling import ddim_scheduler, encode_prompts, latent_size

STEPS = 10  # sampling steps of the one-call comparisons
OFFICIAL_TOKENS_AT_512 = 32**2  # freeprompt.py / P2P null-text nb: self maps replaced where queries ≤ 32²
OFFICIAL_LATENT_SIDE = 64  # SD 1.x at 512 px


# --- the official controllers, re-implemented -------------------------------------------------------------
class OfficialFPE:
    """freeprompt.py SelfAttentionControlEdit: cond half only; self maps with q ≤ limit, step < int(0.8·T)."""

    def __init__(self, step: int, limit: int, frac: float = 0.8):
        self.step, self.limit, self.end = step, limit, int(frac * STEPS)

    def __call__(self, maps: torch.Tensor, is_cross: bool) -> torch.Tensor:  # (2·B·H, q, k)
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
    (index by mapper, blend by alphas); cross α_t from get_time_words_attention_alpha (T+1 rows)."""

    def __init__(self, step: int, limit: int, mode: str, mapper, alphas=None, cross: float = 0.8, self_: float = 0.4):
        self.step, self.limit, self.mode, self.mapper, self.alphas = step, limit, mode, mapper, alphas
        self.alpha_t = 1.0 if self.step < int(cross * (STEPS + 1)) else 0.0
        self.self_end = int(self_ * STEPS)

    def __call__(self, maps, is_cross):
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
            m[1:] = new * self.alpha_t + (1 - self.alpha_t) * repl
        elif repl.shape[2] <= self.limit:
            m[1:] = base.unsqueeze(0).expand_as(repl)
        return m.reshape(maps.shape)


class OfficialProcessor:
    """The official CrossAttention forward: explicit maps, the controller edits them, maps @ v."""

    def __init__(self, controller):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        maps = (torch.einsum("bid,bjd->bij", q, k) * attn.scale).softmax(-1)
        maps = self.controller(maps, is_cross)
        out = attn.batch_to_head_dim(torch.einsum("bij,bjd->bid", maps, v))
        return attn.to_out[1](attn.to_out[0](out))


# --- one UNet call, ours vs the reference ------------------------------------------------------------------
def one_call_inputs(pipe, source: str, target: str, step: int):
    sched = ddim_scheduler(pipe)
    sched.set_timesteps(STEPS)
    h, w = latent_size(pipe)
    z = torch.randn((2, pipe.unet.config.in_channels, h, w), generator=torch.Generator().manual_seed(7))
    context = torch.cat([encode_prompts(pipe, ["", ""]), encode_prompts(pipe, [source, target])])
    return torch.cat([z, z]), sched.timesteps[step], context  # rows [uncond src, uncond tgt, cond src, cond tgt]


@torch.no_grad()
def ours_vs_official(pipe, hooks: dict, controller, source: str, target: str, step: int):
    x, t, context = one_call_inputs(pipe, source, target, step)
    plain = pipe.unet(x, t, encoder_hidden_states=context).sample
    with HookSet(pipe.unet, list(hooks), lambda layer, state: hooks[layer](layer, state)) as hookset:
        hookset.on_step_begin(step, int(t), STEPS, BatchLayout(2))
        ours = pipe.unet(x, t, encoder_hidden_states=context).sample
    procs = {name: OfficialProcessor(controller) for name in pipe.unet.attn_processors}
    with installed(pipe.unet, procs):
        ref = pipe.unet(x, t, encoder_hidden_states=context).sample
    return ours, ref, plain


def official_limit(pipe) -> int:
    """The official ≤ 32² query tokens at a 64² latent, at this model's latent size."""
    h, w = latent_size(pipe)
    return OFFICIAL_TOKENS_AT_512 * h * w // OFFICIAL_LATENT_SIDE**2


@pytest.mark.parametrize("step", [2, 9])  # inside / outside the first 80 % of the steps
def test_fpe_one_unet_call_matches_the_official_controller(tiny_pipe, step):
    src, tgt = "a white car", "a red car"
    hooks = self_replace_hooks(tiny_pipe, "official", 0.8, STEPS)
    assert [x.index for x in hooks] == list(range(3, 14))  # SD 1.5 layers 3-13
    ours, ref, plain = ours_vs_official(tiny_pipe, hooks, OfficialFPE(step, official_limit(tiny_pipe)), src, tgt, step)
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-3 if step < 8 else (ours - plain).abs().max() <= 1e-5
    assert (ours[:3] - plain[:3]).abs().max() <= 1e-5  # the uncond rows and the source are untouched


P2P_CASES = [
    # replace, 1 → 3 tokens ("mat" is split into letters by the tiny tokenizer): ratio split + the tail quirk
    ("a cat sitting on chair", "a mat sitting on chair", "replace", 2),
    ("a cat sitting on chair", "a mat sitting on chair", "replace", 6),  # cross only (self steps are 0..3)
    ("a red car", "a blue car", "replace", 1),
    ("a cat sitting on chair", "a big cat sitting on chair", "refine", 2),  # "big": 3 tokens, no source
]


@pytest.mark.parametrize("source,target,mode,step", P2P_CASES)
def test_p2p_one_unet_call_matches_the_official_controller(tiny_pipe, source, target, mode, step):
    tok = tiny_pipe.tokenizer
    settings = dict(cross_replace_steps=0.8, self_replace_steps=0.4, cross_layers="all", self_layers="official",
                    refine=True)
    hooks, used = p2p_hooks(tiny_pipe, source, target, STEPS, **settings)
    assert used == mode
    if mode == "replace":
        controller = OfficialP2P(step, official_limit(tiny_pipe), mode,
                                 replacement_mapper(source, target, tok, tok.model_max_length))
    else:
        mapper, alphas = refinement_mapper(source, target, tok, tok.model_max_length)
        controller = OfficialP2P(step, official_limit(tiny_pipe), mode, mapper, alphas.reshape(1, 1, 1, -1))
    ours, ref, plain = ours_vs_official(tiny_pipe, hooks, controller, source, target, step)
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours[3] - plain[3]).abs().max() > 1e-3  # the call did edit the target
    assert (ours[:3] - plain[:3]).abs().max() <= 1e-5


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


def test_global_align_tie_order_is_left_then_up_then_diagonal():
    # x = [1, 2], y = [2, 1]: at (2, 2) left and up tie at score 1; left wins → y[1] has no source, y[0] ← x[1]
    trace = global_align([1, 2], [2, 1])
    assert trace.tolist() == [[4, 1, 1], [2, 1, 3], [2, 3, 1]]
    assert aligned_sources([1, 2], [2, 1], trace) == [1, -1]


# --- LocalBlend ---------------------------------------------------------------------------------------------
def official_local_blend(x_t, maps: list[torch.Tensor], alpha: torch.Tensor, side: int, th: float):
    """LocalBlend.__call__ of the null-text notebook (after start_blend), on stored maps (2·H, side², L)."""
    maps = torch.cat([m.reshape(2, -1, 1, side, side, m.shape[-1]) for m in maps], dim=1)
    maps = (maps * alpha).sum(-1).mean(1)
    maps = torch.nn.functional.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    mask = torch.nn.functional.interpolate(maps, size=x_t.shape[2:])
    mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
    mask = mask.gt(th)
    mask = (mask[:1] + mask).float()
    return x_t[:1] + mask * (x_t - x_t[:1])


def test_local_blend_matches_the_official_mask_and_blend(tiny_pipe):
    src, tgt = "a cat sitting on chair", "a mat sitting on chair"
    blend = make_local_blend(tiny_pipe, src, tgt, STEPS, words=None, threshold=0.3, start_blend=0.2)
    h, _ = latent_size(tiny_pipe)
    assert [x.height for x in blend.layers] == [h // 4] * 5  # down ×2, up ×3
    assert blend.steps == set(range(2, 10))  # blending from step int(0.2·10) on
    assert blend.alphas[0].nonzero().flatten().tolist() == [2] and blend.alphas[1].nonzero().flatten().tolist() == [
        2, 3, 4]
    g = torch.Generator().manual_seed(3)
    stored = {x.label: [] for x in blend.layers}
    for _ in range(2):  # two steps: the maps are summed
        for x in blend.layers:
            probs = torch.rand((2, 8, x.tokens, 77), generator=g).softmax(-1)
            blend.recorder.add(LocalBlend.MAPS, x, probs)
            stored[x.label].append(probs)
    x_t = torch.randn((2, 4, h, h), generator=g)
    assert blend.on_step_end(1, 0, x_t) is None  # counter 2 ≤ start (the official ``counter > start_blend``)
    ours = blend.on_step_end(2, 0, x_t)
    summed = [sum(stored[x.label]).reshape(16, x.tokens, 77) for x in blend.layers]
    ref = official_local_blend(x_t, summed, blend.alphas.reshape(2, 1, 1, 1, 1, 77), h // 4, 0.3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert 0 < (ours[1] != x_t[1]).float().mean() < 1  # part of the target was reset to the source


def test_p2p_local_blend_option_runs_and_bounds(tiny_pipe, make_method):
    from evaluation.datasets import EditExample

    ex = EditExample("x", "a red car", "a blue car")
    plain = make_method("p2p", num_inference_steps=2)(tiny_pipe, ex, 5)
    none_kept = make_method("p2p", num_inference_steps=2, local_blend={"threshold": 1.5, "start_blend": 0.0})
    src, edited = none_kept(tiny_pipe, ex, 5)
    torch.testing.assert_close(edited, src)  # empty mask: the target is the source after every step
    all_kept = make_method("p2p", num_inference_steps=2, local_blend={"threshold": -1.0, "start_blend": 0.0})
    torch.testing.assert_close(all_kept(tiny_pipe, ex, 5)[1], plain[1])  # full mask: plain P2P
    with pytest.raises(UserError, match="no blend word"):
        make_method("p2p", num_inference_steps=2, local_blend={"words": ["dog", "cat"], "threshold": 0.3,
                                                               "start_blend": 0.2})(tiny_pipe, ex, 5)


# --- null-text inversion --------------------------------------------------------------------------------------
def official_null_text(pipe, latents: list[torch.Tensor], prompt: str, guidance: float, num_inner_steps: int,
                       epsilon: float) -> list[torch.Tensor]:
    """NullInversion.null_optimization (null_text_w_ptp.ipynb, verbatim in null_text_w_FPE.ipynb), with its
    own ``prev_step`` (α_prev = α[t − 1000/T], else the final α)."""
    sched = ddim_scheduler(pipe)
    sched.set_timesteps(len(latents) - 1)
    ratio = sched.config.num_train_timesteps // (len(latents) - 1)

    def prev_step(eps, t, x):
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[t - ratio] if t - ratio >= 0 else sched.final_alpha_cumprod
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def noise(x, t, ctx):
        return pipe.unet(x, t, encoder_hidden_states=ctx).sample

    cond, uncond = encode_prompts(pipe, [prompt]), encode_prompts(pipe, [""])
    out, latent_cur = [], latents[-1]
    for i in range(len(latents) - 1):
        uncond = uncond.clone().detach()
        uncond.requires_grad = True
        optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        latent_prev, t = latents[len(latents) - i - 2], sched.timesteps[i]
        with torch.no_grad():
            noise_cond = noise(latent_cur, t, cond)
        for _ in range(num_inner_steps):
            noise_uncond = noise(latent_cur, t, uncond)
            pred = noise_uncond + guidance * (noise_cond - noise_uncond)
            loss = torch.nn.functional.mse_loss(prev_step(pred, t, latent_cur), latent_prev)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < epsilon + i * 2e-5:
                break
        out.append(uncond[:1].detach())
        with torch.no_grad():
            noise_uncond = noise(latent_cur, t, uncond)
            latent_cur = prev_step(noise_uncond + guidance * (noise_cond - noise_uncond), t, latent_cur)
    pipe.unet.zero_grad(set_to_none=True)
    return out


def test_null_text_inversion_matches_the_official_loop(tiny_pipe):
    from editing.inversion import ddim_invert, null_text_inversion, null_text_schedule

    steps, prompt = 2, "a white car"
    schedule = null_text_schedule()
    assert schedule == {"inner_steps": 10, "lr": 1e-2, "lr_decay": 1e-2, "early_stop": 1e-5, "early_stop_growth": 2e-5}
    z0 = torch.randn((1, 4, *latent_size(tiny_pipe)), generator=torch.Generator().manual_seed(1))
    traj = ddim_invert(tiny_pipe, z0, prompt, steps, progress=False)
    ours = null_text_inversion(tiny_pipe, traj, prompt, 7.5, progress=False, inner_steps=3)
    ref = official_null_text(tiny_pipe, traj, prompt, 7.5, 3, 1e-5)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # a constant lr (no decay) is off by 3e-4
    # the early stop at early_stop + growth·i: a huge threshold stops after one update per step
    once = null_text_inversion(tiny_pipe, traj, prompt, 7.5, progress=False, inner_steps=3, early_stop=1e9)
    ref_once = official_null_text(tiny_pipe, traj, prompt, 7.5, 1, 1e-5)
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
