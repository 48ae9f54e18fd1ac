"""pix2pix-zero (Parmar et al., SIGGRAPH 2023) on the shared hook layer and sampler.

diffusers' ``StableDiffusionPix2PixZeroPipeline`` is deprecated (``diffusers.pipelines.deprecated``),
so the method is written here on the attention recorder (:mod:`sdattn.recorder`) and our DDIM maths:

1. Edit direction Δ = mean text embedding (full (L, D) token embeddings) of target sentences − mean of
   source sentences (official ``construct_direction``). ``direction: banks`` (default): the words that
   differ between the pair's prompts (same word count) each have a sentence bank
   ``<sentence_banks>/<word>.txt``; Δ = Σ_changed (mean E(bank[new]) − mean E(bank[old])). The official
   banks are ~1000 LLM sentences per word; ours are small template banks (:func:`template_sentences`,
   in the official fixed-template spirit, within the toy world's vocabulary so they also work on the
   toy model). A pair whose words have no bank falls back to ``missing_bank: prompts`` (Δ = E(target) −
   E(source)) or is an error (``missing_bank: error``). ``direction: prompts`` always uses the prompts;
   ``direction: sentences`` takes ``source_sentences`` / ``target_sentences`` (lists, a ``.txt`` file
   or a ``.pt`` mean embedding such as the official ``assets/embeddings_sd_1.4/*.pt``).
2. Reference pass: DDIM with CFG ``[negative, c]`` from z_T, recording the cross-attention maps of both
   CFG rows (every head, every cross layer, every step) with the attention recorder.
3. Edit pass from the same z_T with ``[negative, c + Δ]`` (Δ on the cond row only), as the official
   ``edit_pipeline.py``: x_in = [x_t, x_t]; one SGD step x_in ← x_in − λ·∇ Σ_layers mean_{rows·heads}
   Σ_{queries, keys} (M − M_ref)² (each CFG row steered by its own maps); ε recomputed on x_in with CFG,
   and the DDIM step taken from the **uncond** copy x_in[0] (official ``latents = x_in.chunk(2)[0]``).
   λ = ``cross_attention_guidance_amount`` (official 0.1 real, 0.15 generated); CFG 5.0 (official).

The two passes run in lock-step (reference step i, then edit step i), so only one step's maps are held.
Real images: the negative prompt is the caption (official ``edit_real.py``: ``negative_prompt=prompt_str``),
so the reference pass is plain ε(c); z_T from DDIM inversion of ``encode_image(image)`` with the
source prompt on the official 48-step schedule (``inversion_schedule``) and the paper's noise
regularisation (auto-correlation + KL on the predicted noise,
``noise_regularization.num_reg_steps: 0`` turns it off).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMInverseScheduler

from sdattn.errors import UserError
from sdattn.hooks import BatchLayout
from sdattn.layers import select_layers
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import ddim_scheduler, decode, encode_image, encode_prompts, guided_noise, initial_latents

from ..two_branch import Images, model_layers

DIRECTIONS = ("banks", "prompts", "sentences")
MISSING_BANK = ("prompts", "error")
REAL_NEGATIVES = ("caption", "empty")
NOISE_REGULARIZATION = {"lambda_auto_corr": float, "lambda_kl": float, "num_reg_steps": int,
                        "num_auto_corr_rolls": int}  # key → type of ``noise_regularization`` (YAML has the values)


# ------------------------------------------------------------------------------------ edit direction

def mean_embedding(pipe, sentences, batch_size: int = 16) -> torch.Tensor:
    """Mean text embedding (1, L, D) of ``sentences``: a list of strings, a ``.txt`` file (one per
    line) or a ``.pt`` file holding a mean embedding ((1, L, D) or (L, D))."""
    if isinstance(sentences, (str, Path)):
        path = Path(sentences).expanduser()
        if not path.is_file():
            raise UserError(f"sentence file {str(path)!r} does not exist: give a list of sentences, a .txt file "
                            "(one per line) or a .pt mean embedding")
        if path.suffix == ".pt":
            emb = torch.load(path, map_location="cpu", weights_only=True)
            emb = emb[None] if torch.is_tensor(emb) and emb.ndim == 2 else emb
            want = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
            if not torch.is_tensor(emb) or emb.ndim != 3 or emb.shape[0] != 1 or tuple(emb.shape[1:]) != want:
                got = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
                raise UserError(f"embedding file {str(path)!r} holds {got}; allowed: a (1, {want[0]}, {want[1]}) "
                                f"or ({want[0]}, {want[1]}) tensor for this text encoder")
            return emb.float()
        sentences = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    sentences = list(sentences or [])
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise UserError(f"sentences {sentences!r} must be a non-empty list of strings (or a .txt / .pt file)")
    total = None
    for i in range(0, len(sentences), batch_size):
        part = encode_prompts(pipe, sentences[i:i + batch_size]).float().sum(0, keepdim=True)  # (1, L, D)
        total = part if total is None else total + part
    return (total / len(sentences)).cpu()


def changed_word_pairs(source_prompt: str, target_prompt: str) -> list[tuple[str, str]] | None:
    """(old, new) word pairs where the prompts differ, for prompts with the same word count; else None."""
    a, b = source_prompt.lower().split(), target_prompt.lower().split()
    if len(a) != len(b):
        return None
    return [(x, y) for x, y in zip(a, b) if x != y]


def bank_direction(pipe, source_prompt: str, target_prompt: str, banks: str | Path,
                   missing_bank: str) -> torch.Tensor:
    """Δ (1, L, D) from the sentence banks of the changed words (see the module docstring)."""
    if missing_bank not in MISSING_BANK:
        raise UserError(f"method.missing_bank {missing_bank!r} is not one of {', '.join(MISSING_BANK)}")
    pairs = changed_word_pairs(source_prompt, target_prompt)
    files = None if not pairs else [(Path(banks) / f"{x}.txt", Path(banks) / f"{y}.txt") for x, y in pairs]
    if files is None or not all(f.is_file() for pair in files for f in pair):
        if missing_bank == "error":
            raise UserError(f"no sentence banks in {str(banks)!r} for the changed words of {source_prompt!r} → "
                            f"{target_prompt!r} (same word count needed; banks: <word>.txt)")
        return mean_embedding(pipe, [target_prompt]) - mean_embedding(pipe, [source_prompt])
    return sum(mean_embedding(pipe, str(new)) - mean_embedding(pipe, str(old)) for old, new in files)


def edit_direction(pipe, source_prompt: str, target_prompt: str, direction: str, source_sentences=None,
                   target_sentences=None, sentence_banks: str | Path | None = None,
                   missing_bank: str = "error") -> torch.Tensor:
    """Δ (1, L, D) = mean embedding of target sentences − mean embedding of source sentences
    (``direction="prompts"``: the pair's own prompts are the sentences; ``"banks"``: the changed words'
    sentence banks under ``sentence_banks``)."""
    mode, src, tgt = str(direction), source_sentences, target_sentences
    if mode not in DIRECTIONS:
        raise UserError(f"method.direction {mode!r} is not one of {', '.join(DIRECTIONS)}")
    if mode != "sentences" and (src is not None or tgt is not None):
        raise UserError(f"method.source_sentences/target_sentences are set but method.direction is {mode!r}: "
                        "set method.direction=sentences to use them")
    if mode == "banks":
        return bank_direction(pipe, source_prompt, target_prompt, sentence_banks, missing_bank)
    if mode == "prompts":
        src, tgt = [source_prompt], [target_prompt]
    elif src is None or tgt is None:
        raise UserError("method.direction=sentences needs both method.source_sentences and method.target_sentences "
                        "(lists, .txt files or .pt mean embeddings)")
    return mean_embedding(pipe, tgt) - mean_embedding(pipe, src)


# ------------------------------------------------------------------------------------- sentence banks

def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def template_sentences(word: str, world: dict) -> list[str]:
    """A word's template sentence bank in the toy world's grammar (``datasets/toy_world.yaml``:
    ``<article> <color> <shape> [<background phrase>]``): a shape in every colour and background, any
    other word (a colour) on every shape in every background."""
    phrases = [v["phrase"] for v in world["backgrounds"].values()]
    if word in world["shapes"]:
        pairs = [(c, word) for c in world["colors"]]
    else:
        pairs = [(word, s) for s in world["shapes"]]
    return [" ".join(f"{article(a)} {a} {b} {p}".split()) for a, b in pairs for p in phrases]


def write_sentence_banks(directory: str | Path, world: dict, words) -> list[Path]:
    """``directory/<word>.txt`` ← :func:`template_sentences` for each word (one sentence per line).
    The shipped banks: the toy world's colours and shapes, ``datasets/probe/color_car.yaml``'s classes
    and the words of the official FPE ``Car_fake_edit.json``."""
    from sdattn.files import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [atomic_write_text(directory / f"{w}.txt", "\n".join(template_sentences(w, world)) + "\n")
            for w in sorted(set(words))]


# ---------------------------------------------------------------------------- cross-attention guidance

MAPS = "maps"  # the guidance recorder's tap


def guidance_rows(layout: BatchLayout) -> list[int]:
    """The rows [uncond, cond] of the one prompt (cond only without CFG)."""
    return [layout.uncond_row(0), layout.cond_row(0)] if layout.cfg else [layout.cond_row(0)]


def guidance_recorder(pipe) -> Recorder:
    """Records every cross layer's maps softmax(QKᵀ·scale) (R, H, N, L) of :func:`guidance_rows` in float32,
    the latest call's, with their autograd graph (the guidance loss backpropagates through them)."""
    cross = select_layers(model_layers(pipe), "all", "cross")
    return Recorder([Tap(cross, "probs", name=MAPS, rows=guidance_rows, heads="all", float32=True, grad=True,
                         over_steps="last", cpu=False)])


def map_loss(maps: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """The official loss: per layer ((M − M_ref)²).sum over queries and keys, mean over rows and heads
    (``loss += ((curr-ref)**2).sum((1,2)).mean(0)``), summed over the layers in run order."""
    loss = 0.0
    for label, m in maps.items():
        loss = loss + ((m - ref[label]) ** 2).sum((-2, -1)).mean()
    return loss


def cfg_step(unet, scheduler, hooks: Recorder, step: int, timestep, num_steps: int, latents: torch.Tensor,
             cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """One DDIM step with classifier-free guidance (``sampling.guided_noise``), hooks told the step first.
    latents (1, C, h, w)."""
    hooks.on_step_begin(step, int(timestep), num_steps, BatchLayout(n=1, cfg=uncond is not None))
    noise = guided_noise(unet, scheduler, latents, timestep, cond, uncond, guidance_scale)
    return scheduler.step(noise, timestep, latents).prev_sample


def guidance_step(unet, scheduler, recorder: Recorder, ref: dict[str, torch.Tensor], step: int, timestep,
                  num_steps: int, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                  amount: float) -> tuple[torch.Tensor, float]:
    """Official x_in step: x_in = [x_t, x_t] (one row without CFG) with context [uncond, cond];
    x_in ← x_in − amount·∇ :func:`map_loss` against the reference maps ``ref`` (SGD, lr = amount), the
    maps recorded by ``recorder`` (:func:`guidance_recorder`). latents (1, C, h, w) → (x_in (R, C, h, w), loss).
    Leaves the recorder paused and empty."""
    cfg = uncond is not None
    recorder.on_step_begin(step, int(timestep), num_steps, BatchLayout(n=1, cfg=cfg))
    context = torch.cat([uncond, cond]) if cfg else cond
    recorder.active = True
    try:
        with torch.enable_grad():
            x = scheduler.scale_model_input(torch.cat([latents, latents]) if cfg else latents, timestep)
            x = x.detach().clone().requires_grad_(True)  # (R, C, h, w)
            unet(x.to(unet.dtype), timestep, encoder_hidden_states=context)
            loss = map_loss(recorder[MAPS], ref)
            (grad,) = torch.autograd.grad(loss, x)
    finally:
        recorder.active = False
        recorder.clear()
    return (x - amount * grad.float()).detach(), float(loss)


def guided_edit_step(unet, scheduler, hooks: Recorder, step: int, timestep, num_steps: int, x_in: torch.Tensor,
                     cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """After :func:`guidance_step`: ε on each steered row of ``x_in`` (R, C, h, w), CFG, and the DDIM step
    from the first (uncond) row, as the official ``latents = x_in.chunk(2)[0]`` → (1, C, h, w)."""
    cfg = uncond is not None
    hooks.on_step_begin(step, int(timestep), num_steps, BatchLayout(n=1, cfg=cfg))
    context = torch.cat([uncond, cond]) if cfg else cond
    noise = unet(x_in.to(unet.dtype), timestep, encoder_hidden_states=context).sample.float()
    if cfg:
        noise_u, noise_c = noise.chunk(2)
        noise = noise_u + guidance_scale * (noise_c - noise_u)
    return scheduler.step(noise, timestep, x_in[:1]).prev_sample


@torch.no_grad()
def pix2pix_zero_sample(pipe, latents: torch.Tensor, cond: torch.Tensor, edit_cond: torch.Tensor,
                        uncond: torch.Tensor | None, num_inference_steps: int, guidance_scale: float,
                        amount: float) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Reference and edit passes from z_T ``latents`` (1, C, h, w). ``cond``/``edit_cond``/``uncond``: (1, L, D).

    Returns (reference z_0, edited z_0, guidance loss per step)."""
    if amount < 0:
        raise UserError(f"method.cross_attention_guidance_amount {amount} is negative; allowed: ≥ 0 (0 = no guidance)")
    unet = pipe.unet
    ref_sched, edit_sched = ddim_scheduler(pipe), ddim_scheduler(pipe)
    ref_sched.set_timesteps(num_inference_steps)
    edit_sched.set_timesteps(num_inference_steps)
    cond, edit_cond = cond.to(unet.device, unet.dtype), edit_cond.to(unet.device, unet.dtype)
    uncond = None if uncond is None else uncond.to(unet.device, unet.dtype)
    z_ref = latents.to(unet.device, torch.float32) * ref_sched.init_noise_sigma
    z = z_ref.clone()
    recorder, losses = guidance_recorder(pipe), []
    timesteps = ref_sched.timesteps
    with recorder.installed(unet):
        for i, t in enumerate(timesteps):
            recorder.active = amount > 0  # the reference maps of this step
            z_ref = cfg_step(unet, ref_sched, recorder, i, t, len(timesteps), z_ref, cond, uncond, guidance_scale)
            recorder.active = False
            if amount > 0:
                ref = recorder[MAPS]
                recorder.clear()
                x_in, loss = guidance_step(unet, edit_sched, recorder, ref, i, t, len(timesteps), z, edit_cond,
                                           uncond, amount)
                losses.append(loss)
                z = guided_edit_step(unet, edit_sched, recorder, i, t, len(timesteps), x_in, edit_cond, uncond,
                                     guidance_scale)
            else:
                z = cfg_step(unet, edit_sched, recorder, i, t, len(timesteps), z, edit_cond, uncond, guidance_scale)
    return z_ref, z, losses


# ------------------------------------------------------------------------------- real-image inversion

AUTO_CORR_MIN_SIDE = 8  # the pyramid's last level: the first one at most this many pixels high


@dataclass(frozen=True)
class RollDraw:
    """How each roll offset of the auto-correlation loss is drawn: uniformly from [low, side // 2) by a seeded
    torch generator. Official (``utils/ddim_inv.py``): ``random.randrange(1, side // 2)`` from Python's global
    generator — the same range; the generator differs (kept: runs are reproducible from the pair's seed). A
    side too small for that range (< 4 px: the official code raises) rolls by ``low``."""

    low: int = 1

    def __call__(self, side: int, generator: torch.Generator) -> int:
        high = side // 2
        return int(torch.randint(self.low, high, (1,), generator=generator)) if high > self.low else self.low


OFFICIAL_ROLLS = RollDraw(low=1)


def pyramid(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """``x`` (1, 1, h, w), then 2×2 average-pooled again and again until a level is at most
    :data:`AUTO_CORR_MIN_SIDE` high (lazily: each level is pooled once the previous one has been used)."""
    while True:
        yield x
        if x.shape[2] <= AUTO_CORR_MIN_SIDE:
            return
        x = torch.nn.functional.avg_pool2d(x, kernel_size=2)


def auto_corr_loss(noise: torch.Tensor, generator: torch.Generator, draw: RollDraw | None = None) -> torch.Tensor:
    """pix2pix-zero's auto-correlation penalty on a predicted ε (B, C, h, w) → scalar: for every channel map
    and every level of its :func:`pyramid`, the squared mean of the map times itself rolled by one random
    offset (``draw``), along the height and along the width, summed. An i.i.d. Gaussian map scores ≈ 0."""
    draw = draw or OFFICIAL_ROLLS
    loss = noise.new_zeros(())
    for b in range(noise.shape[0]):
        for c in range(noise.shape[1]):
            for level in pyramid(noise[b:b + 1, c:c + 1]):
                shift = draw(level.shape[2], generator)
                for dim in (2, 3):
                    loss = loss + (level * torch.roll(level, shifts=shift, dims=dim)).mean() ** 2
    return loss


def kl_loss(noise: torch.Tensor) -> torch.Tensor:
    """KL divergence (up to constants) of N(mean, var) of all of ``noise``'s values to N(0, 1)."""
    mean, var = noise.mean(), noise.var()
    return var + mean ** 2 - 1 - torch.log(var + 1e-7)


def descend(x: torch.Tensor, loss_fn, rate: float, divisor: int = 1) -> torch.Tensor:
    """One gradient step x − rate·∇loss_fn(x)/divisor, taken on a detached copy of ``x``."""
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(leaf), leaf)
    return (x - rate * grad / divisor).detach()


def regularize_noise(noise: torch.Tensor, generator: torch.Generator, lambda_auto_corr: float, lambda_kl: float,
                     num_reg_steps: int, num_auto_corr_rolls: int, draw: RollDraw | None = None) -> torch.Tensor:
    """pix2pix-zero's noise regularisation of a predicted ε (B, C, h, w): ``num_reg_steps`` rounds, each of
    ``num_auto_corr_rolls`` descent steps on :func:`auto_corr_loss` (rate λ_ac / rolls, fresh offsets each)
    then one on :func:`kl_loss` (rate λ_kl); a λ of 0 skips its steps."""
    noise = noise.detach().float()
    with torch.enable_grad():
        for _ in range(num_reg_steps):
            for _ in range(num_auto_corr_rolls if lambda_auto_corr > 0 else 0):
                noise = descend(noise, lambda e: auto_corr_loss(e, generator, draw), lambda_auto_corr,
                                num_auto_corr_rolls)
            if lambda_kl > 0:
                noise = descend(noise, kl_loss, lambda_kl)
    return noise


INVERSION_SCHEDULES = ("official", "full")


def inversion_steps(pipe, num_inference_steps: int, schedule: str) -> list[tuple[int, float, float]]:
    """(UNet timestep, ᾱ from, ᾱ to) per inversion step. ``official`` (pix2pix-zero ``utils/ddim_inv.py``
    with ``utils/scheduler.py: step(reverse=True)``): the sampling timesteps ascending without the first
    and last (N − 2 steps, SD: t = 21 … 961), each from ᾱ[t − 1] to ᾱ[t − 1 + 1000/N]; ``full``: diffusers'
    ``DDIMInverseScheduler`` (N steps, t = 1 … 981, from the level of t − 1000/N to t)."""
    if schedule not in INVERSION_SCHEDULES:
        raise UserError(f"method.inversion_schedule {schedule!r} is not one of {', '.join(INVERSION_SCHEDULES)}")
    sampler = ddim_scheduler(pipe)
    sampler.set_timesteps(num_inference_steps)
    alphas = sampler.alphas_cumprod
    ratio = sampler.config.num_train_timesteps // num_inference_steps
    if schedule == "official":
        ascending = sampler.timesteps.flip(0)[1:-1].tolist()
        return [(t, float(alphas[t - 1]), float(alphas[t - 1 + ratio])) for t in ascending]
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(num_inference_steps)
    first = float(inverse.initial_alpha_cumprod)
    return [(t, float(alphas[t - ratio]) if t - ratio >= 0 else first, float(alphas[t]))
            for t in inverse.timesteps.tolist()]


@torch.no_grad()
def regularized_inversion(pipe, latents: torch.Tensor, prompt: str, num_inference_steps: int, *, seed: int,
                          schedule: str, lambda_auto_corr: float, lambda_kl: float, num_reg_steps: int,
                          num_auto_corr_rolls: int, draw: RollDraw | None = None) -> torch.Tensor:
    """DDIM inversion (no guidance, ``prompt``) with pix2pix-zero's noise regularisation, on the
    ``schedule`` of :func:`inversion_steps`. latents z_0 (B, C, h, w) → z_T. ``full`` with
    ``num_reg_steps=0`` is plain ``editing.inversion.ddim_invert``."""
    unet = pipe.unet
    if num_reg_steps > 0 and pipe.scheduler.config.prediction_type != "epsilon":
        raise UserError(f"pix2pix-zero noise regularisation needs an epsilon-prediction model, this one predicts "
                        f"{pipe.scheduler.config.prediction_type!r}: set method.noise_regularization.num_reg_steps=0")
    generator = torch.Generator().manual_seed(int(seed))
    context = encode_prompts(pipe, [prompt] * latents.shape[0]).to(unet.device, unet.dtype)
    z = latents.to(unet.device, torch.float32)
    for t, a_from, a_to in inversion_steps(pipe, num_inference_steps, schedule):
        noise = unet(z.to(unet.dtype), t, encoder_hidden_states=context).sample.float()
        if num_reg_steps > 0:
            noise = regularize_noise(noise, generator, lambda_auto_corr, lambda_kl, num_reg_steps,
                                     num_auto_corr_rolls, draw)
        pred_x0 = (z - (1 - a_from) ** 0.5 * noise) / a_from ** 0.5
        z = a_to ** 0.5 * pred_x0 + (1 - a_to) ** 0.5 * noise
    return z


# ---------------------------------------------------------------------------------------- the method

def check_noise_regularization(given: dict) -> dict:
    """The ``noise_regularization`` node checked (every key of :data:`NOISE_REGULARIZATION`, no other)
    and typed."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(NOISE_REGULARIZATION))
    if unknown:
        raise UserError(f"method.noise_regularization has unknown key {unknown[0]!r}; "
                        f"allowed: {', '.join(NOISE_REGULARIZATION)}")
    missing = [k for k in NOISE_REGULARIZATION if k not in given]
    if missing:
        raise UserError(f"method.noise_regularization lacks {', '.join(missing)}")
    return {k: kind(given[k]) for k, kind in NOISE_REGULARIZATION.items()}


def edit_pix2pix_zero(pipe, example, seed: int, image: torch.Tensor | None = None, *, direction: str,
                      sentence_banks: str, missing_bank: str, source_sentences, target_sentences,
                      cross_attention_guidance_amount: dict, real_negative_prompt: str, inversion_schedule: str,
                      noise_regularization: dict, num_inference_steps: int, guidance_scale: float) -> Images:
    """Benchmark entry (``configs/method/pix2pix_zero.yaml``): edit direction Δ added to the source
    embedding, x_t steered so the edited cross-attention maps follow the reference pass's → (source, edited).
    ``cross_attention_guidance_amount``: {real, generated}; ``real_negative_prompt``: caption | empty."""
    steps, guidance = int(num_inference_steps), float(guidance_scale)
    amounts = dict(cross_attention_guidance_amount or {})
    if set(amounts) != {"real", "generated"}:
        raise UserError(f"method.cross_attention_guidance_amount needs the keys real and generated; "
                        f"got {sorted(amounts)}")
    inversion_steps(pipe, steps, inversion_schedule)  # a bad schedule fails before any sampling
    if real_negative_prompt not in REAL_NEGATIVES:
        raise UserError(f"method.real_negative_prompt {real_negative_prompt!r} is not one of "
                        f"{', '.join(REAL_NEGATIVES)}")
    amount = float(amounts["generated" if image is None else "real"])
    regularization = check_noise_regularization(noise_regularization)
    src, tgt = example.source_prompt, example.target_prompt
    cond = encode_prompts(pipe, [src])  # (1, L, D)
    delta = edit_direction(pipe, src, tgt, direction, source_sentences, target_sentences, sentence_banks,
                           missing_bank).to(cond)  # (1, L, D)
    negative = src if image is not None and real_negative_prompt == "caption" else ""
    uncond = encode_prompts(pipe, [negative]) if guidance > 1 else None
    if image is None:
        z_T = initial_latents(pipe, [seed])
    else:
        z_T = regularized_inversion(pipe, encode_image(pipe, image), src, steps, seed=seed, schedule=inversion_schedule,
                                    **regularization)
    z_src, z_edit, _ = pix2pix_zero_sample(pipe, z_T, cond, cond + delta, uncond, steps, guidance, amount)
    return (decode(pipe, z_src) if image is None else image), decode(pipe, z_edit)
