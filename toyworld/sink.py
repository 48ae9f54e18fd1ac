"""Give the toy model SD's start-token attention sink (issue 25): an initialisation for continued training.

In SD 1.x the start token takes most of every cross-attention map (0.9–0.99 of the mass on most layers);
the toy model, whose text encoder was trained with its UNet, puts ~9 % there and ~60 % on the padding,
which carries the whole prompt (``python -m toyworld.diagnose_tokens``). The map of a word is its softmax
share, so in the toy every word's map is normalised against colour-carrying keys: the map of "a" carries
the colour (claim (b) fails) and the colour word's map carries less of it (Table 1). Raising the start
token's logit by δ ≈ 8 for every query (the counterfactual ``sink +8`` of the diagnosis) makes the start
token take ~91 % and moves both the right way.

This module writes that sink into standard weights: a cross-attention query gets a constant part from the
bias of the LayerNorm before it (``norm2`` of each transformer block feeds only ``attn2``), so per layer
the bias gets Δβ with ``to_q(Δβ) = c``, where each head's part of c has the scaled dot product δ with the
start token's key and as nearly the same dot product as possible with every other key of the prompts
(least squares on the centred keys: a common offset of the other keys leaves their shares unchanged).
The start token's key is the same in every prompt (the text encoder is causal), so the boost is too.

    python -m toyworld.sink --model models/toy --out outputs/sink_init --boost 8

writes the pipeline with the sink to ``--out`` (then continue training from it: ``toy.init_pipeline``)
and prints, per layer, the boost of the start token over the mean of the others and their spread.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
from collections.abc import Collection
from pathlib import Path

import torch

from toyworld.model import load_pipeline, save_pipeline
from toyworld.world import load_world


@torch.no_grad()
def text_states(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's start-token state (D,) and every other position's states (N, D) over ``prompts``."""
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    states = pipe.text_encoder(ids)[0].float()  # (P, L, D)
    return states[0, 0], states[:, 1:].reshape(-1, states.shape[-1])


def cross_blocks(unet):
    """(name, norm before the cross-attention, the cross-attention) of every transformer block."""
    for name, module in unet.named_modules():
        if hasattr(module, "attn2") and getattr(module, "attn2", None) is not None and hasattr(module, "norm2"):
            yield name, module.norm2, module.attn2


@torch.no_grad()
def sink_query(attn, start: torch.Tensor, others: torch.Tensor, boost: float, ridge: float = 1e-4) -> torch.Tensor:
    """The constant query part c (inner,) giving the start token a logit ``boost`` above the others' mean,
    per head, with the least spread over the other keys."""
    ks, ko = attn.to_k(start[None].to(attn.to_k.weight)).float()[0], attn.to_k(others.to(attn.to_k.weight)).float()
    d = ks.numel() // attn.heads
    parts = []
    for h in range(attn.heads):
        s, o = ks[h * d:(h + 1) * d], ko[:, h * d:(h + 1) * d]
        mean = o.mean(0)
        oc, sc = o - mean, s - mean
        m = oc.T @ oc / len(oc) + ridge * torch.eye(d)
        w = torch.linalg.solve(m, sc)
        parts.append(boost / attn.scale * w / (sc @ w))
    return torch.cat(parts)


@torch.no_grad()
def install_start_sink(pipe, prompts: list[str], boost: float | list[float]) -> list[dict]:
    """Add the sink to ``pipe``'s UNet in place (``boost``: one for every layer, or one per cross layer in
    :func:`cross_blocks` order); per layer: the start token's logit over the others' mean and the standard
    deviation of the others' added logits (both averaged over heads)."""
    start, others = text_states(pipe, prompts)
    blocks = list(cross_blocks(pipe.unet))
    boosts = list(boost) if isinstance(boost, (list, tuple)) else [boost] * len(blocks)
    report = []
    for (name, norm, attn), b in zip(blocks, boosts):
        c = sink_query(attn, start, others, b)
        wq = attn.to_q.weight.float()  # (inner, C)
        delta = torch.linalg.lstsq(wq, c[:, None]).solution[:, 0]
        norm.bias += delta.to(norm.bias)
        added = (wq @ delta)  # what the queries really get
        ks, ko = attn.to_k(start[None]).float()[0], attn.to_k(others).float()
        d = ks.numel() // attn.heads
        lift, spread = [], []
        for h in range(attn.heads):
            cs = added[h * d:(h + 1) * d] * attn.scale
            lo = ko[:, h * d:(h + 1) * d] @ cs
            lift.append(float(ks[h * d:(h + 1) * d] @ cs - lo.mean()))
            spread.append(float(lo.std()))
        report.append({"layer": name, "start_lift": sum(lift) / len(lift), "others_spread": sum(spread) / len(spread)})
    return report


@torch.no_grad()
def start_direction(start: torch.Tensor, others: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """w (D,) with w·(start − mean) = 1 and the least variance of w·other over the other states (ridge
    relative to their mean variance): a text feature that is 1 for the start token and ~constant elsewhere."""
    mean = others.mean(0)
    oc, d = others - mean, start - mean
    m = oc.T @ oc / len(oc)
    m += ridge * m.diagonal().mean() * torch.eye(len(d))
    w = torch.linalg.solve(m, d)
    return w / (d @ w)


@torch.no_grad()
def install_key_sink(pipe, prompts: list[str], boost: float, kappa: float = 4.0,
                     layers: Collection[str] | None = None) -> list[dict]:
    """An exact start-token sink: every query's logit for the start token rises by ``boost`` over the other
    keys' mean, whatever the query, and the other keys' logits keep their differences except along one
    direction per head (the one in which the centred keys vary least).

    Per cross layer and head (head dim d, direction u, text feature w of :func:`start_direction`):
    the query gets a constant component κ·u — exact, because LayerNorm's output y = γ⊙x̂ + β has
    Σᵢ (yᵢ − βᵢ)/γᵢ = 0, so s·y is constant for s ∝ 1/γ (``norm2.bias`` moves by γ first, so that
    constant is far from 0, and ``to_q`` is corrected to give the same queries) — and the key gets
    g·(w·text state)·u in place of its u component; the start token's logit then exceeds the others' mean
    by κ·g·scale = ``boost``. Returns per layer the lift, the others' spread (boost × std of w·state) and the
    share of the centred keys' variance lost with u (mean over heads). ``layers``: only these cross layers (labels,
    e.g. ``cross-3``) get the sink; the others are left as they are."""
    start, others = text_states(pipe, prompts)
    w = start_direction(start, others)
    spread = float(boost * (others @ w).std())
    report = []
    labels = [x.label for x in model_cross_layers(pipe)]
    for label, (name, norm, attn) in zip(labels, cross_blocks(pipe.unet)):
        if layers is not None and label not in layers:
            continue
        gamma = norm.weight.float()
        norm.bias += gamma.to(norm.bias)  # β' = β + γ: Σ β'/γ ≈ C, far from 0
        beta = norm.bias.float()
        s_vec = 1 / (gamma * (beta / gamma).sum())  # s·y = 1 for every LayerNorm output y
        wq, wk = attn.to_q.weight.float(), attn.to_k.weight.float()  # (inner, C), (inner, D)
        wq = wq - (wq @ gamma)[:, None] * s_vec[None]  # the same queries as before the bias moved
        keys = torch.cat([start[None], others]).to(wk) @ wk.T  # (N + 1, inner)
        d = wq.shape[0] // attn.heads
        g = boost / (kappa * attn.scale)
        lost = []
        for h in range(attn.heads):
            r = slice(h * d, (h + 1) * d)
            kc = keys[:, r] - keys[:, r].mean(0)
            evals, evecs = torch.linalg.eigh(kc.T @ kc)
            u = evecs[:, 0]  # least variance of the keys
            lost.append(float(evals[0] / evals.sum()))
            proj = torch.eye(d) - torch.outer(u, u)
            wq[r] = proj @ wq[r] + kappa * torch.outer(u, s_vec)
            wk[r] = proj @ wk[r] + g * torch.outer(u, w.to(wk))
        attn.to_q.weight.copy_(wq.to(attn.to_q.weight))
        attn.to_k.weight.copy_(wk.to(attn.to_k.weight))
        report.append({"layer": name, "label": label, "start_lift": boost, "others_spread": spread,
                       "key_variance_lost": sum(lost) / len(lost)})
    return report


@torch.no_grad()
def start_shares(pipe, prompts: list[str], steps: int, guidance: float) -> dict[str, float]:
    """{layer label: mean attention share of the start token} while sampling ``prompts`` (seeds 0..)."""
    from toyworld.diagnose_tokens import Positions, capture

    feats, layers = capture(pipe, prompts, list(range(len(prompts))), steps, guidance, len(prompts), Positions())
    return {x.label: float(feats[(x.label, "mass")][:, 0].mean()) for x in layers}


@torch.no_grad()
def compensate_values(pipe, before: dict[str, float], after: dict[str, float]) -> None:
    """Keep each cross layer's output near what it was: the other tokens' part of the output shrank by
    (1 − after) / (1 − before) on average, so ``to_v`` is scaled by the inverse, and the start token's value,
    the same for every prompt, is taken out of ``to_out``'s bias for the change of its mean share."""
    start, _ = text_states(pipe, [""])
    labels = [x.label for x in model_cross_layers(pipe)]
    for label, (_, _, attn) in zip(labels, cross_blocks(pipe.unet)):
        alpha = (1 - before[label]) / (1 - after[label])
        v_start = attn.to_v(start[None].to(attn.to_v.weight))[0]  # (inner,)
        attn.to_out[0].bias -= attn.to_out[0].weight @ ((alpha * after[label] - before[label]) * v_start)
        attn.to_v.weight *= alpha


@torch.no_grad()
def calibrate_sink(pipe, prompts: list[str], probe: list[str], share: float, boost: float, steps: int,
                   guidance: float, rounds: int) -> tuple[list[float], dict[str, float]]:
    """Install the sink with a boost per layer such that the start token's measured share while sampling
    ``probe`` is near ``share`` on every layer: ``rounds`` corrections of each boost by the difference of the
    log-odds (the other keys' spread makes the share of a given boost differ per layer). Returns the
    boosts and the shares of the last installed sink (``pipe`` holds it)."""
    original = copy.deepcopy(pipe.unet.state_dict())
    labels = [x.label for x in model_cross_layers(pipe)]
    boosts = [boost] * len(labels)
    target = math.log(share / (1 - share))
    for r in range(rounds + 1):
        pipe.unet.load_state_dict(original)
        install_start_sink(pipe, prompts, boosts)
        shares = start_shares(pipe, probe, steps, guidance)
        print(f"round {r}: " + ", ".join(f"{x} +{b:.1f} → {shares[x]:.1%}" for x, b in zip(labels, boosts)),
              flush=True)
        if r < rounds:
            boosts = [b + target - math.log(shares[x] / (1 - shares[x])) for x, b in zip(labels, boosts)]
    return boosts, shares


def model_cross_layers(pipe):
    """The cross layers in the order of :func:`cross_blocks` (module order), as LayerIds."""
    from sdattn.layers import enumerate_layers
    from sdattn.sampling import latent_size

    by_name = {x.name: x for x in enumerate_layers(pipe.unet, latent_size(pipe)) if x.kind == "cross"}
    return [by_name[f"{name}.attn2.processor"] for name, _, _ in cross_blocks(pipe.unet)]


def all_prompts(world) -> list[str]:
    """Every prompt of the grammar, and the empty prompt (the unconditional branch)."""
    return [""] + [world.make_prompt(c, s, b) for c in world.colors for s in world.shapes for b in world.backgrounds]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/toy")
    ap.add_argument("--out", required=True)
    ap.add_argument("--boost", type=float, default=8.0)
    ap.add_argument("--share", type=float, default=None,
                    help="calibrate each layer's boost (from --boost) until the start token takes this share")
    ap.add_argument("--rounds", type=int, default=3, help="calibration rounds (with --share)")
    ap.add_argument("--method", choices=("query", "key"), default="query",
                    help="query: least-squares query bias (approximate); key: exact (install_key_sink)")
    ap.add_argument("--layers", nargs="+", default=None,
                    help="with --method key: only these cross layers get the sink (labels, e.g. cross-2 cross-3)")
    ap.add_argument("--grammar", default=None)
    ap.add_argument("--images", type=int, default=10, help="prompts sampled to measure the start token's share")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    world = load_world(args.grammar)
    probe = [world.make_prompt(c, s) for c, s in zip(world.colors, list(world.shapes) * 2)][:args.images]
    known = sorted((x.label for x in model_cross_layers(pipe)), key=lambda label: int(label.rsplit("-", 1)[1]))
    if args.layers is not None and args.method != "key":
        print(f"error: --layers is only for --method key, not --method {args.method}", file=sys.stderr)
        raise SystemExit(2)
    if args.layers is not None and (unknown := sorted(set(args.layers) - set(known))):
        print(f"error: --layers {' '.join(unknown)}: not a cross layer of {args.model}; allowed: {' '.join(known)}",
              file=sys.stderr)
        raise SystemExit(2)
    before = start_shares(pipe, probe, args.steps, args.guidance)
    if args.method == "key":
        for r in install_key_sink(pipe, all_prompts(world), args.boost, layers=args.layers):
            print(f"{r['layer']:45s} start logit +{r['start_lift']:.2f} over the others' mean; others' spread "
                  f"{r['others_spread']:.3f}; key variance lost {r['key_variance_lost']:.2%}")
        after = start_shares(pipe, probe, args.steps, args.guidance)
    elif args.share is not None:
        _, after = calibrate_sink(pipe, all_prompts(world), probe, args.share, args.boost, args.steps,
                                  args.guidance, args.rounds)
    else:
        for r in install_start_sink(pipe, all_prompts(world), args.boost):
            print(f"{r['layer']:45s} start logit +{r['start_lift']:.2f} over the others' mean; "
                  f"others' added logits spread {r['others_spread']:.2f}")
        after = start_shares(pipe, probe, args.steps, args.guidance)
    compensate_values(pipe, before, after)
    for label in before:
        print(f"{label}: start token share {before[label]:.1%} → {after[label]:.1%}")
    out = save_pipeline(pipe, args.out)
    src = Path(args.model)
    for extra in ("sdattn.yaml", "toy_model.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, out / extra)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
