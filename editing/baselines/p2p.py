"""Prompt-to-Prompt (Hertz et al., ICLR 2023) on the shared hook layer, as google/prompt-to-prompt
runs it: the target's cross-attention maps ← the source's through ``seq_aligner``'s mappers ("replace":
the word-level mapper, prompts with the same number of words; "refine": Needleman–Wunsch token
alignment, new tokens keep their own map) plus self-attention maps; real images through DDIM +
null-text inversion with the source prompt. The official code lets the user choose replace or
refine; here the rule is: replace when the prompts have the same number of words (the only case
the official replacement mapper accepts), else refine."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from sdattn.errors import UserError
from sdattn.hooks import AttentionHook, StepState
from sdattn.layers import LayerId, select_layers
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import check_prompts, decode, encode_image, initial_latents
from sdattn.steps import parse_steps

from ..inversion import ddim_invert, null_text_inversion
from ..replace import AttentionReplace
from ..seq_aligner import refinement_mapper, replacement_mapper, word_positions
from ..two_branch import SOURCE, TARGET, Images, model_layers, replacement_edit

MapEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (A_src, A_tgt) (H, N, L) → new A_tgt
# LocalBlend reads the cross maps whose side is 1/4 of the latent's (official: the 16² maps at 512 px,
# ``attention_store["down_cross"][2:4] + attention_store["up_cross"][:3]``)
BLEND_RESOLUTION = "1/4"
BLEND_POOL = 3  # the official 3×3 max-pool (k = 1) of the word maps
KINDS_OF_PAIR = ("generated", "real")


def per_pair_kind(setting, kind: str):
    """A setting given once, or as {generated: ..., real: ...} (the two official notebooks differ)."""
    if isinstance(setting, Mapping):
        if set(setting) != set(KINDS_OF_PAIR):
            raise UserError(f"p2p setting {setting!r} must have exactly the keys {list(KINDS_OF_PAIR)}")
        return setting[kind]
    return setting


def p2p_mode(source_prompt: str, target_prompt: str) -> str:
    """``replace`` when the prompts have the same number of words (split on " ", as seq_aligner), else ``refine``."""
    return "replace" if len(source_prompt.split(" ")) == len(target_prompt.split(" ")) else "refine"


def cross_map_edit(tokenizer, source_prompt: str, target_prompt: str, mode: str,
                   equalizer: torch.Tensor | None = None) -> MapEdit:
    """The official ``replace_cross_attention`` of AttentionReplace / AttentionRefine as a function; with
    ``equalizer`` (L,) the edited maps are then scaled per text token (AttentionReweight wrapping them)."""
    n = tokenizer.model_max_length
    if mode == "replace":
        mapper = replacement_mapper(source_prompt, target_prompt, tokenizer, n)  # (L, L)
        edit = lambda a_src, a_tgt: a_src @ mapper.to(a_src)  # noqa: E731
    else:
        index, alphas = refinement_mapper(source_prompt, target_prompt, tokenizer, n)  # (L,), (L,)
        edit = lambda a_src, a_tgt: (a_src[..., index.to(a_src.device)] * alphas.to(a_src)  # noqa: E731
                                     + a_tgt * (1 - alphas.to(a_src)))
    if equalizer is None:
        return edit
    return lambda a_src, a_tgt: edit(a_src, a_tgt) * equalizer.to(a_src)


def make_equalizer(tokenizer, source_prompt: str, target_prompt: str, *, words=None, values) -> torch.Tensor:
    """P2P's attention re-weighting (official ``get_equalizer`` + ``AttentionReweight``): (L,) ones, the tokens
    of each of ``words`` in the target prompt × its value. ``words``: target words (``values`` one per word,
    or one for all), or None for the target words that change (:func:`blend_words`)."""
    words = blend_words(source_prompt, target_prompt)[1] if words is None else [words] if isinstance(words, str) \
        else list(words)
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * len(words)
    if not words or len(values) != len(words):
        raise UserError(f"method.reweight: words {words!r} and values {values!r} must be non-empty and of equal "
                        "length (or one value for all words)")
    eq = torch.ones(tokenizer.model_max_length)
    for word, value in zip(words, values):
        positions = word_positions(target_prompt, str(word), tokenizer)
        if not positions:
            raise UserError(f"method.reweight: the word {word!r} is not in the target prompt {target_prompt!r}")
        eq[positions] = float(value)
    return eq


def pair_cond_rows(layout) -> list[int]:
    """The conditional rows of the source and the target."""
    return [layout.cond_row(SOURCE), layout.cond_row(TARGET)]


class LocalBlend:
    """P2P's LocalBlend (official ``null_text_w_ptp.ipynb``), a sampler callback: its recorder sums the
    conditional cross maps (2, H, N, L) of both prompts on :attr:`layers` over the steps (the target's
    *after* the P2P edit, :meth:`recording`: the official AttentionStore keeps the tensor the controller
    then edits in place); after each of its ``steps``, the mask of the blend words (word maps averaged over
    heads and layers, 3×3 max-pooled, nearest-upsampled to the latent, divided by their maximum,
    > ``threshold``; source mask OR target mask) decides where the target keeps its latent:
    z_tgt ← z_src + mask·(z_tgt − z_src)."""

    MAPS = "blend"

    def __init__(self, layers: list[LayerId], alphas: torch.Tensor, threshold: float, steps: set[int]):
        self.layers, self.alphas = layers, alphas  # alphas (2, L): 1 on the blend words' tokens
        self.threshold, self.steps = threshold, steps
        self.recorder = self._recorder(None)

    def _recorder(self, target_maps) -> Recorder:
        return Recorder([Tap(self.layers, "probs", name=self.MAPS, rows=pair_cond_rows, heads="all",
                             transform=target_maps, over_steps="sum", cpu=False)])

    def recording(self, hooks: dict, target_maps=None) -> dict:
        """``hooks`` ({layer: factory}) with the blend layers' maps recorded; ``target_maps(layer, state,
        maps)``: the (2, H, N, L) maps [source, target] as the P2P hooks make them."""
        self.recorder = self._recorder(target_maps)
        return self.recorder.hooks(hooks)

    def mask(self, size: tuple[int, int]) -> torch.Tensor:
        """(2, 1, h, w) bool: where the blend words are, source OR target (the target's row)."""
        summed = self.recorder[self.MAPS]  # layer label → (2, H, N, L) summed over steps
        maps = torch.cat([summed[x.label].reshape(2, -1, 1, x.height, x.width, self.alphas.shape[-1])
                          for x in self.layers], 1)  # (2, H·layers, 1, h', w', L)
        words = (maps * self.alphas.to(maps)[:, None, None, None, None]).sum(-1).mean(1)  # (2, 1, h', w')
        words = torch.nn.functional.max_pool2d(words, BLEND_POOL, 1, padding=BLEND_POOL // 2)
        words = torch.nn.functional.interpolate(words, size=size)
        words = words / words.amax((2, 3), keepdim=True)
        mask = words > self.threshold
        return mask[:1] | mask

    def on_step_begin(self, step, timestep, num_steps, layout):
        return None

    def on_step_end(self, step, timestep, latents):  # latents (2, C, h, w): [source, target]
        if step not in self.steps:
            return None
        mask = self.mask(tuple(latents.shape[2:])).to(latents)
        return latents[:1] + mask * (latents - latents[:1])


def enabled(setting: Mapping | None) -> bool:
    """An optional P2P setting (``local_blend``, ``reweight``) is on: given, and ``enabled`` not false."""
    return setting is not None and bool(setting.get("enabled", True))


def option(setting: Mapping) -> dict:
    """The keyword arguments of an optional P2P setting (without ``enabled``)."""
    return {k: v for k, v in setting.items() if k != "enabled"}


def blend_words(source_prompt: str, target_prompt: str) -> tuple[list[str], list[str]]:
    """The words that change: at equal word index (same word count), else those not in the other prompt."""
    a, b = source_prompt.split(" "), target_prompt.split(" ")
    if len(a) == len(b):
        pairs = [(x, y) for x, y in zip(a, b) if x != y]
        return [x for x, _ in pairs], [y for _, y in pairs]
    return [x for x in a if x not in b], [y for y in b if y not in a]


def make_local_blend(pipe, source_prompt: str, target_prompt: str, num_inference_steps: int, *, words=None,
                     threshold: float, start_blend: float) -> LocalBlend:
    """LocalBlend for one pair. ``words``: [source word(s), target word(s)] (the official argument), or
    None for the words that change (:func:`blend_words`, our rule for benchmarks); ``start_blend``: a
    fraction of the steps (official ``int(0.2·50)``: blending after step 10, i.e. from step 10 on)."""
    tok = pipe.tokenizer
    if words is None:
        words = blend_words(source_prompt, target_prompt)
    if len(words) != 2:
        raise UserError(f"method.local_blend.words {words!r} must be [source word(s), target word(s)]")
    alphas = torch.zeros(2, tok.model_max_length)
    for row, (prompt, chosen) in enumerate(zip((source_prompt, target_prompt), words)):
        for word in [chosen] if isinstance(chosen, str) else list(chosen):
            alphas[row, word_positions(prompt, str(word), tok)] = 1.0
    if not alphas.any():
        raise UserError(f"local blend: no blend word of {words!r} is in {source_prompt!r} / {target_prompt!r}")
    layers = select_layers(model_layers(pipe), "all", "cross", BLEND_RESOLUTION)
    if not layers:
        raise UserError(f"local blend needs cross-attention layers at {BLEND_RESOLUTION} of the latent's side")
    steps = parse_steps([float(start_blend), 1.0], num_inference_steps, "fraction", "method.local_blend.start_blend")
    return LocalBlend(layers, alphas, float(threshold), steps)


class CrossMapEdit(AttentionHook):
    """P2P on a cross layer, conditional branch, active steps: the target's attention map becomes
    ``edit(A_src, A_tgt)`` (maps (H, N, L)), then · V_target; every other row is plain attention."""

    def __init__(self, layer: LayerId, state: StepState, steps: set[int], edit: MapEdit):
        super().__init__(layer, state)
        self.steps, self.edit = steps, edit

    def attend(self, attn, query, key, value, mask):
        out = super().attend(attn, query, key, value, mask)
        if self.state.step not in self.steps:
            return out
        rows = pair_cond_rows(self.state.layout)
        probs = torch.softmax(query[rows] @ key[rows].transpose(-1, -2) * attn.scale, -1)  # (2, H, N, L)
        out = out.clone()
        out[rows[1]] = self.edit(probs[0], probs[1]) @ value[rows[1]]
        return out


def p2p_hooks(pipe, source_prompt: str, target_prompt: str, num_inference_steps: int, *, cross_replace_steps,
              self_replace_steps, cross_layers, self_layers, refine: bool,
              blend: LocalBlend | None = None, equalizer: torch.Tensor | None = None) -> tuple[dict, str]:
    """{layer: factory} for P2P: cross maps (replace or refine, :func:`p2p_mode`, re-weighted by
    ``equalizer``) + self maps, and the ``blend``'s layers recorded (the target's maps as edited); and the mode."""
    layers = model_layers(pipe)
    # official get_time_words_attention_alpha: α has N + 1 rows, active rows int(a·(N+1))..int(b·(N+1))-1
    cross = parse_steps(cross_replace_steps, num_inference_steps + 1, "fraction", "method.cross_replace_steps")
    self_steps = parse_steps(self_replace_steps, num_inference_steps, "fraction", "method.self_replace_steps")
    mode = p2p_mode(source_prompt, target_prompt)
    if mode == "refine" and not refine:
        raise UserError(f"p2p refine is off (method.refine=false) and {source_prompt!r} → {target_prompt!r} "
                        "differ in word count")
    edit = cross_map_edit(pipe.tokenizer, source_prompt, target_prompt, mode, equalizer)
    edited = select_layers(layers, cross_layers, "cross")
    hooks: dict = {layer: lambda lay, st: CrossMapEdit(lay, st, cross, edit) for layer in edited}
    for layer in select_layers(layers, self_layers, "self"):
        hooks[layer] = lambda lay, st: AttentionReplace(lay, st, [(SOURCE, TARGET)], self_steps)
    if blend is not None:
        edited = set(edited)

        def target_maps(layer, state, maps):  # (2, H, N, L) [source, target] → as CrossMapEdit attends
            if layer in edited and state.step in cross:
                return torch.stack([maps[0], edit(maps[0], maps[1])])
            return maps

        hooks = blend.recording(hooks, target_maps)
    return hooks, mode


def edit_p2p(pipe, example, seed: int, image: torch.Tensor | None = None, *, cross_replace_steps,
             self_replace_steps, cross_layers, self_layers, refine: bool, local_blend: dict | None,
             reweight: dict | None, null_text: dict | None, num_inference_steps: int, guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/p2p.yaml``): one pair → (source, edited). ``self_replace_steps``
    and ``self_layers``: one value, or {generated, real} (official: the stable and the null-text
    notebook). Real images: DDIM inversion and null-text inversion (``null_text``: overrides of the
    official schedule) with the pair's source prompt (official ``null_text_w_ptp.ipynb``). ``reweight``
    ({enabled, words, values}): the official AttentionReweight on the target's edited cross maps;
    ``local_blend`` ({enabled, words, threshold, start_blend}): the official LocalBlend."""
    steps, guidance = int(num_inference_steps), float(guidance_scale)
    src, tgt = example.source_prompt, example.target_prompt
    check_prompts(pipe.tokenizer, [src, tgt])
    kind = "generated" if image is None else "real"
    blend = make_local_blend(pipe, src, tgt, steps, **option(local_blend)) if enabled(local_blend) else None
    equalizer = make_equalizer(pipe.tokenizer, src, tgt, **option(reweight)) if enabled(reweight) else None
    hooks, _ = p2p_hooks(pipe, src, tgt, steps, cross_replace_steps=cross_replace_steps,
                         self_replace_steps=per_pair_kind(self_replace_steps, kind), cross_layers=cross_layers,
                         self_layers=per_pair_kind(self_layers, kind), refine=refine, blend=blend, equalizer=equalizer)
    callbacks = [blend] if blend is not None else []
    if image is None:
        out = replacement_edit(pipe, src, tgt, initial_latents(pipe, [seed]), hooks, steps, guidance,
                               callbacks=callbacks, progress=False)
        images = decode(pipe, out)
        return images[:1], images[1:]
    traj = ddim_invert(pipe, encode_image(pipe, image), src, steps, progress=False)
    uncond = null_text_inversion(pipe, traj, src, guidance, progress=False, **(null_text or {}))
    out = replacement_edit(pipe, src, tgt, traj[-1], hooks, steps, guidance, uncond=uncond, callbacks=callbacks,
                           progress=False)
    return image, decode(pipe, out[1:])
