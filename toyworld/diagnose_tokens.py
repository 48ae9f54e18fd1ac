"""Where does the colour in the cross-attention map of "a" come from? (issue 25, claim (b), Table 3)

The toy's text encoder is causal (CLIP), so the keys of the start token and of "a" (positions 0, 1)
are the same in every prompt "a <colour> car": whatever colour the map of "a" carries comes either
from the **softmax share** (the map is normalised against the other keys, the colour word's and the
padding's among them, which do change with the colour) or from the **queries** (the image features at
that layer). This module samples the prompts of the probe family, records per cross layer and step
(conditional branch, mean over heads) several versions of the map of "a" and probes each for the
colour, with the claims' protocol (random splits by image seed; the probe settings of
``configs/probe/cross_attn.yaml`` and ``configs/trainer/probe.yaml``, here as scikit-learn's MLP):

- ``map``            softmax(q·k/√d)[a] — what Table 3 probes;
- ``no colour key``  the map renormalised without the colour word's column, p_a / (1 − p_colour);
- ``no padding``     the map renormalised over start, "a", colour, noun and end (padding masked);
- ``fixed keys``     the map renormalised over the keys that are the same in every prompt,
                     p_a / (p_start + p_a) = sigmoid(l_a − l_start): the queries alone;
- ``logit``          the pre-softmax logit l_a = q·k_a/√d: the queries alone, and the limit of the map
                     when a start token takes almost all of the attention (SD: the map → ∝ exp(l_a));
- ``sink +δ``        the map with the start token's logit raised by δ (a counterfactual SD-like sink; the
                     start token's resulting share is printed beside it);

plus the colour word's, the noun's and the start token's maps for reference, and the attention mass of every key
position (start, "a", colour, noun, end, padding) — SD's start token takes most of it.

    python -m toyworld.diagnose_tokens [--model models/toy] [--n-per-class 8] [--splits 5]
        [--template "a {cls} {fill}" --fill circle,square,... --classes red,green,...]

prints the mass table and one probe-accuracy table (rows: variants; columns: layers, mean over layers,
each the mean over splits ± its 95 % t-interval half-width).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import OmegaConf
from scipy import stats

from probing.prompts import build_prompts
from sdattn.files import REPO_ROOT
from sdattn.hooks import AttentionHook, HookSet
from sdattn.layers import enumerate_layers
from sdattn.sampling import latent_size, sample
from sdattn.settings import SETTINGS_FILE
from toyworld.model import load_pipeline

VARIANTS = ("map", "no colour key", "no padding", "fixed keys", "logit")
SINKS = (2.0, 4.0, 8.0)  # counterfactual start-token logit boosts (SD: the start token takes most of the mass)
REFERENCES = ("colour word: map", "colour word: logit", f"colour word: sink +{SINKS[-1]:g}", "noun: map",
              "noun: logit", "start: map")


@dataclass(frozen=True)
class Positions:
    """Key positions of "a <colour> <noun>" (start token at 0)."""

    start: int = 0
    article: int = 1
    colour: int = 2
    noun: int = 3
    end: int = 4


class TokenMapRecorder(AttentionHook):
    """Sums over steps of the versions of the map of "a" (conditional rows, mean over heads); output = SDPA."""

    def __init__(self, layer, state, sums: dict, pos: Positions):
        super().__init__(layer, state)
        self.sums, self.pos = sums, pos

    def add(self, name: str, value: torch.Tensor) -> None:
        key = (self.layer.label, name)
        self.sums[key] = self.sums.get(key, 0) + value.detach().float()

    def attend(self, attn, query, key, value, mask):
        rows, p = self.state.layout.cond_rows, self.pos
        logits = query[rows] @ key[rows].transpose(-1, -2) * attn.scale  # (B, H, N, L)
        probs = logits.softmax(-1)
        pa, pc, ps = probs[..., p.article], probs[..., p.colour], probs[..., p.start]  # (B, H, N)
        self.add("map", pa.mean(1))
        self.add("no colour key", (pa / (1 - pc)).mean(1))
        self.add("fixed keys", (pa / (ps + pa)).mean(1))
        self.add("no padding", logits[..., :p.end + 1].softmax(-1)[..., p.article].mean(1))
        self.add("logit", logits[..., p.article].mean(1))
        for boost in SINKS:  # the start token's logit raised by `boost`: a sink, as SD's start token
            sunk = logits.clone()
            sunk[..., p.start] += boost
            sp = sunk.softmax(-1)
            self.add(f"sink +{boost:g}", sp[..., p.article].mean(1))
            self.add(f"sink +{boost:g} start share", sp[..., p.start].mean((1, 2)))
        self.add(f"colour word: sink +{SINKS[-1]:g}", sp[..., p.colour].mean(1))
        self.add("colour word: logit", logits[..., p.colour].mean(1))
        self.add("noun: logit", logits[..., p.noun].mean(1))
        self.add("colour word: map", pc.mean(1))
        self.add("noun: map", probs[..., p.noun].mean(1))
        self.add("start: map", ps.mean(1))  # 1 − the others' share: what a sink leaves of the softmax share
        self.add("mass", probs.mean((1, 2)))  # (B, L)
        self.add("queries", query[rows])  # (B, H, N, d): their step mean, for the colour subspace
        self.add("article key", key[rows][:, :, p.article] - key[rows][:, :, p.start])  # (B, H, d): k_a − k_start
        self.add("steps", torch.ones(()))
        return super().attend(attn, query, key, value, mask)


def capture(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int,
            pos: Positions) -> tuple[dict, list]:
    """{(layer label, variant): (N images, queries) step means} and the cross layers."""
    layers = [x for x in enumerate_layers(pipe.unet, latent_size(pipe)) if x.kind == "cross"]
    parts: dict = {}
    for i in range(0, len(prompts), batch):
        sums: dict = {}
        with HookSet(pipe.unet, layers, lambda layer, state: TokenMapRecorder(layer, state, sums, pos)) as hooks:
            sample(pipe, prompts[i:i + batch], seeds[i:i + batch], num_inference_steps=steps,
                   guidance_scale=guidance, callbacks=[hooks], decode_images=False, progress=False)
        for (label, name), v in sums.items():
            if name != "steps":
                parts.setdefault((label, name), []).append(v / sums[(label, "steps")])
        print(f"  captured {min(i + batch, len(prompts))} / {len(prompts)} images", flush=True)
    return {k: torch.cat(v).numpy() for k, v in parts.items()}, layers


def cached_capture(path: Path | None, *args) -> tuple[dict, list[str]]:
    """:func:`capture`, or its result read back from ``path`` (.npz) when that exists; written there after."""
    if path is not None and path.is_file():
        data = np.load(path)
        feats = {tuple(k.split("|")): data[k] for k in data.files}
        return feats, sorted({k[0] for k in feats}, key=lambda s: int(s.rsplit("-", 1)[1]))
    feats, layers = capture(*args)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **{"|".join(k): v for k, v in feats.items()})
    return feats, [x.label for x in layers]


def probe_accuracy(x: np.ndarray, y: np.ndarray, image_seeds: np.ndarray, n_test: int, split: int,
                   mlp: dict, epochs: int) -> float:
    """Test accuracy of the project's probe (Linear → ReLU → Dropout → Linear, AdamW; the hidden size,
    dropout, lr, weight decay, batch size and epochs of the probe config) on one random split by image
    seed (the same seeds held out for every class, as the claims' probes); features z-scored by the
    training split."""
    held = np.random.default_rng(split).choice(np.unique(image_seeds), n_test, replace=False)
    train = torch.from_numpy(~np.isin(image_seeds, held))
    x, y = torch.from_numpy(x).float().flatten(1), torch.from_numpy(y)
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    with torch.random.fork_rng(devices=[]):  # initialisation, batches and dropout: seeded by the split
        torch.manual_seed(split)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], int(mlp["hidden"])), torch.nn.ReLU(),
                                  torch.nn.Dropout(float(mlp["dropout"])),
                                  torch.nn.Linear(int(mlp["hidden"]), int(y.max()) + 1))
        opt = torch.optim.AdamW(net.parameters(), lr=float(mlp["lr"]), weight_decay=float(mlp["weight_decay"]))
        xt, yt = x[train], y[train]
        for _ in range(epochs):
            for idx in torch.randperm(len(xt)).split(int(mlp["batch_size"])):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
                opt.step()
    net.eval()
    with torch.no_grad():
        return float((net(x[~train]).argmax(-1) == y[~train]).float().mean())


def colour_subspace(queries: np.ndarray, y: np.ndarray, article_key: np.ndarray, energy: float = 0.9) -> dict:
    """How much the colour moves the queries along k_a − k_start, per head, averaged over heads.

    ``queries`` (images, H, N, d) step means, ``y`` (images,) colour classes, ``article_key`` (H, d). Per head, on
    the images' spatial-mean queries m (images, d): B = the covariance of the per-colour means, T = the covariance
    of m. η²(v) = vᵀBv / vᵀTv is the colour's share of the variance of the spatial-mean logit m·v over images;
    reported along v = k_a − k_start (what the map of "a" inherits once a sink takes all of the mass), for a
    random direction (tr B / tr T) and for the most and the least colour-laden directions (the generalised
    eigenvalues' extremes); with the colour rank (B's eigenvectors holding ``energy`` of its trace) beside the
    head dim."""
    rows: dict[str, list] = {"head dim": [], "colour rank": [], "eta2 along k_a - k_start": [],
                             "eta2, random direction": [], "eta2, most colour-laden direction": [],
                             "eta2, least colour-laden direction": []}
    classes = np.unique(y)
    for h in range(queries.shape[1]):
        m = queries[:, h].astype(np.float64).mean(1)  # (images, d)
        means = np.stack([m[y == c].mean(0) for c in classes])  # (C, d)
        between = np.cov(means.T, bias=True)
        total = np.cov(m.T, bias=True) + 1e-12 * np.eye(m.shape[1])
        evals = np.linalg.eigvalsh(between)[::-1]
        v = article_key[h].astype(np.float64)
        rows["head dim"].append(m.shape[1])
        rows["colour rank"].append(int(np.searchsorted(np.cumsum(evals) / evals.sum(), energy) + 1))
        rows["eta2 along k_a - k_start"].append(float(v @ between @ v / (v @ total @ v)))
        rows["eta2, random direction"].append(float(np.trace(between) / np.trace(total)))
        generalised = np.linalg.eigvals(np.linalg.solve(total, between)).real
        rows["eta2, most colour-laden direction"].append(float(generalised.max()))
        rows["eta2, least colour-laden direction"].append(max(0.0, float(generalised.min())))  # rounding: ≥ 0
    return {k: float(np.mean(v)) for k, v in rows.items()}


def family_prompts(family: dict, n_per_class: int, classes: list[str] | None = None, template: str | None = None,
                   fills: list[str] | None = None) -> tuple[list[str], list[int], np.ndarray]:
    """The prompts, image seeds and class indices of ``n_per_class`` images per class of a probe ``family`` (the
    probes' own :func:`probing.prompts.build_prompts`; ``classes`` a subset), its template replaced by ``template``
    and ``{fill}`` filled from ``fills``: the class's k-th image (seed k) gets ``fills[k % len(fills)]``, so every
    class sees the same fills (nouns, backgrounds) on the same seeds, variation that is not the colour."""
    template = template or family["template"]
    if ("{fill}" in template) != bool(fills):
        raise ValueError(f"template {template!r} and fills {fills}: give fills exactly when the template has {{fill}}")
    fill = {**(family.get("fill") or {}), **({"fill": list(fills)} if fills else {})}
    items = build_prompts({**family, "template": template, "fill": fill}, n_per_class, classes=classes)
    order = list(classes or family["classes"])
    return [p.prompt for p in items], [p.seed for p in items], np.array([order.index(p.label) for p in items])


def column(label: str) -> str:
    """A layer label "cross-3" → the table column "L3"."""
    return f"L{label.rsplit('-', 1)[1]}"


def interval(values: list[float], level: float = 0.95) -> str:
    v = np.asarray(values) * 100
    half = stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.inf
    return f"{v.mean():.1f} ± {half:.1f}"


def sampling_settings(model: str) -> tuple[int, float]:
    """(steps, guidance scale) from the toy model folder's own settings (relative folders: to the repository)."""
    folder = Path(model) if Path(model).is_absolute() else REPO_ROOT / model
    settings = yaml.safe_load((folder / SETTINGS_FILE).read_text())
    return int(settings["steps"]), float(settings["guidance_scale"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/toy")
    ap.add_argument("--family", default="datasets/probe/toy_color_car.yaml")
    ap.add_argument("--template", default=None,
                    help='prompt template instead of the family\'s, e.g. "a {cls} {fill}" with --fill')
    ap.add_argument("--fill", default=None,
                    help="comma-separated words or phrases for {fill}, cycled over each class's seeds (the same on "
                         "every class); the prompts must keep one length (the key positions are the first's)")
    ap.add_argument("--classes", default=None, help="comma-separated subset of the family's classes")
    ap.add_argument("--n-per-class", type=int, default=8)
    ap.add_argument("--test-per-class", type=int, default=2)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--features", type=Path, default=None,
                    help="an .npz file: the captured maps are read from it if it exists, else written to it")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    family = yaml.safe_load((REPO_ROOT / args.family).read_text())
    mlp = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "configs/probe/cross_attn.yaml").mlp)
    epochs = int(OmegaConf.load(REPO_ROOT / "configs/trainer/probe.yaml").max_epochs)
    classes = args.classes.split(",") if args.classes else list(family["classes"])
    template = args.template or family["template"]
    prompts, seeds, y = family_prompts(family, args.n_per_class, classes, template,
                                       args.fill.split(",") if args.fill else None)
    words = prompts[0].split()
    pos = Positions(article=1, colour=2, noun=3, end=1 + len(words))
    steps, guidance = sampling_settings(args.model)
    print(f"model {args.model}: {len(prompts)} images ({template}), {steps} steps, guidance {guidance}, "
          f"context {pipe.tokenizer.model_max_length} tokens", flush=True)
    feats, labels = cached_capture(args.features, pipe, prompts, seeds, steps, guidance, args.batch, pos)

    names = ["start", "a", "colour", "noun", "end", "padding"]
    mass = {}
    for label in labels:
        m = feats[(label, "mass")].mean(0)  # (L,)
        mass[column(label)] = [m[0], m[1], m[2], m[3], m[pos.end], m[pos.end + 1:].sum()]
    mass_df = pd.DataFrame(mass, index=names).mul(100)
    mass_df["mean"] = mass_df.mean(axis=1)
    print("\nattention mass per key position, % (conditional branch, mean over images, queries, heads, steps)")
    print(mass_df.round(1).to_markdown())

    rows = {}
    image_seeds = np.asarray(seeds)
    sinks = [f"sink +{b:g}" for b in SINKS]
    for name in sinks:
        share = np.mean([feats[(x, f"{name} start share")].mean() for x in labels]) * 100
        print(f"{name}: start token share {share:.1f} % (mean over layers)")
    for name in VARIANTS + tuple(sinks) + REFERENCES:
        accs = {column(x): [probe_accuracy(feats[(x, name)], y, image_seeds, args.test_per_class, s, mlp, epochs)
                            for s in range(args.splits)] for x in labels}
        row = {k: interval(v) for k, v in accs.items()}
        row["mean over layers"] = interval(list(np.mean(list(accs.values()), axis=0)))
        rows[name] = row
        print(f"  probed {name}", flush=True)
    if (labels[0], "queries") in feats:  # (older feature files lack the queries)
        sub = {column(x): colour_subspace(feats[(x, "queries")], y, feats[(x, "article key")][0]) for x in labels}
        sub_df = pd.DataFrame(sub)
        print("\nthe colour in the queries along k_a − k_start (per head, mean over heads; eta2: the colour's share "
              "of the variance over images of the spatial-mean logit along a direction; see colour_subspace)")
        print(sub_df.round(2).to_markdown())
    table = pd.DataFrame(rows).T
    print(f"\ncolour probe accuracy, % (mean ± 95 % t half-width over {args.splits} splits; "
          f"{args.test_per_class * len(classes)} test images each; chance {100 / len(classes):.1f} %)")
    print(table.rename_axis("map of 'a' as").to_markdown())


if __name__ == "__main__":
    main()
