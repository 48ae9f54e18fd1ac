"""``experiment=claims``: each qualitative finding of Liu et al. checked on the model, with numbers,
confidence intervals over seeds and a PASS / FAIL / SKIP verdict (the statistics: :mod:`evaluation.claims`).

(a) Table 1 vs 2: the colour is decodable from the colour word's cross-attention maps, far above chance
    and above the self-attention maps.   (b) Table 3: the map of "a" carries no colour, the noun's some.
(c) Fig. 4: cross-attention maps replaced on all layers hurt the edit; self-attention maps replaced on
    the middle layers keep the layout and make the edit (with the whole layer sweep as curves).
(d) Fig. 5: replacing or subtracting a non-edited word's cross-attention map can break the edit.

Probes reuse the probe task's feature cache and Lightning probes; edits reuse the ablation rows and the
model's checker (``claims.checkers``: the toy world's pixel checker) to score edit-correct and mask IoU.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from editing.grid import labelled_grid
from editing.two_branch import model_layers, pair_rows, replacement_edits
from evaluation.claims import Check, Claim, Interval, bootstrap_interval, t_interval
from evaluation.claims_plots import bars_figure, probe_figure, sweep_figure
from experiments.common import instantiate, load_model, output_dir, plain
from experiments.tasks.ablation import ablation_rows
from experiments.tasks.probe import collect_features, family_path
from experiments.tracking import log_claims
from probing.capture import CaptureSpec
from probing.probe import train_probe
from probing.prompts import build_prompts, load_family
from sdattn.errors import ModelLoadError, UserError, first_line
from sdattn.files import atomic_save, atomic_write_text
from sdattn.layers import select_layers
from sdattn.sampling import check_prompts, decode, initial_latents

METRICS = {"edit_ok": "edit correct", "mask_iou": "mask IoU source↔edited"}
PLAIN = "target (no edit)"
ACCURACY, DIFFERENCE = (0.0, 1.0), (-1.0, 1.0)  # possible ranges: intervals are clipped to them
CAPTURE_KEYS = ("family", "steps", "grid", "layers", "num_inference_steps", "guidance_scale", "batch_size")


# --------------------------------------------------------------------------- probes (claims a, b)
@dataclass
class ProbeSet:
    """One probed feature: a probe config node, the capture it comes from and the word (cross)."""

    name: str
    node: DictConfig
    word: str | None  # token spec of a cross map ("{cls}" = the colour word); None for self maps


def random_split(image_seeds: list[int], n_test: int, seed: int) -> torch.Tensor:
    """(N,) bool train mask: ``n_test`` of the image seeds, drawn at random by ``seed``, are the test split
    of every class. Split by image seed, as the probe task's: every class holds out the same noise seeds,
    so no test image has a training twin from the same noise (one layout, another colour)."""
    held_out = np.random.default_rng(seed).choice(sorted(set(image_seeds)), n_test, replace=False)
    return torch.from_numpy(~np.isin(np.asarray(image_seeds), held_out))


def _view(cfg: DictConfig, node: DictConfig) -> DictConfig:
    """The run config with ``probe`` = ``node`` (what the probe task's capture reads)."""
    view = copy.deepcopy(cfg)
    with open_dict(view):
        view.probe = node
    return view


def _capture_key(node: DictConfig) -> tuple:
    return tuple(json.dumps(plain(node[k]), sort_keys=True) for k in CAPTURE_KEYS)


def probe_sets(c: DictConfig) -> list[ProbeSet]:
    """Table 1's colour word, Table 2's self maps, Table 3's words (each once)."""
    p = c.probes
    if p.cross.kind != "cross" or p.self.kind != "self" or p.tokens.kind != "cross":
        raise UserError("claims.probes: cross and tokens must probe cross-attention maps, self self-attention maps")
    if not p.cross.family == p.self.family == p.tokens.family:
        raise UserError(f"claims.probes: one prompt family for all probes, not {p.cross.family!r}, {p.self.family!r} "
                        f"and {p.tokens.family!r}")
    sets = [ProbeSet(f"cross: {w.replace('{cls}', 'colour word')}", p.cross, w) for w in p.cross.tokens]
    sets.append(ProbeSet("self", p.self, None))
    sets += [ProbeSet(f"cross: {w}", p.tokens, w) for w in p.tokens.tokens if w not in p.cross.tokens]
    for w in (c.words.no_colour, c.words.colour):
        if f"cross: {w}" not in [s.name for s in sets]:
            raise UserError(f"claims.words: {w!r} is not one of the probed words {list(p.tokens.tokens)}")
    return sets


def capture_all(cfg: DictConfig, pipe, sets: list[ProbeSet], prompts) -> dict[str, dict[str, torch.Tensor]]:
    """{set name: {layer label: (N, F) features}}. Cross sets with the same capture settings share one
    sampling pass (their words captured together); everything goes through the probe feature cache."""
    groups: dict[tuple, list[ProbeSet]] = {}
    for s in sets:
        groups.setdefault((s.node.kind, _capture_key(s.node)), []).append(s)
    out = {}
    for (kind, _), members in groups.items():
        node = members[0].node
        layers = select_layers(model_layers(pipe), plain(node.layers), kind)
        words = [s.word for s in members] if kind == "cross" else []
        spec = CaptureSpec(kind=kind, tokens=words, steps=node.steps, grid=node.grid, pool=node.pool)
        view = _view(cfg, node)
        feats = collect_features(view, pipe, prompts, layers, spec, load_family(family_path(view)))
        for s in members:
            t = words.index(s.word) if kind == "cross" else None
            out[s.name] = {x.label: (feats[x.label][:, t] if t is not None else feats[x.label]).flatten(1)
                           for x in layers}
    return out


def run_probes(cfg: DictConfig, pipe) -> dict:
    """Probe accuracy per set × layer × probe seed, each seed on its own random split."""
    c = cfg.claims
    sets = probe_sets(c)
    node = c.probes.cross
    family = load_family(family_path(_view(cfg, node)))
    prompts = build_prompts(family, c.probe.n_per_class, c.probe.test_fraction, plain(node.classes))
    classes = list(dict.fromkeys(x.label for x in prompts))
    labels = [x.label for x in prompts]
    y = torch.tensor([classes.index(x) for x in labels])
    n_test = sum(1 for x in prompts if x.label == classes[0] and x.split == "test")  # images per class
    image_seeds = [x.seed for x in prompts]
    feats = capture_all(cfg, pipe, sets, prompts)
    make_trainer = instantiate(cfg.trainer)
    rows = []
    fits = [(s, layer, seed) for s in sets for layer in feats[s.name] for seed in c.probe.seeds]
    for s, layer, seed in tqdm(fits, desc="probes", disable=not cfg.progress):
        train = random_split(image_seeds, n_test, int(seed))
        x = feats[s.name][layer]
        r = train_probe(x[train], y[train], x[~train], y[~train], n_classes=len(classes), make_trainer=make_trainer,
                        seed=int(seed), **s.node.mlp)
        rows.append({"set": s.name, "layer": layer, "seed": int(seed), "accuracy": r.overall})
    return {"runs": pd.DataFrame(rows), "sets": [s.name for s in sets], "chance": 1 / len(classes),
            "n_images": len(prompts), "n_test": n_test * len(classes), "classes": classes}


def layer_mean(runs: pd.DataFrame, name: str) -> np.ndarray:
    """Per probe seed: the accuracy of set ``name`` averaged over its layers (the tables' Avg)."""
    return runs[runs.set == name].groupby("seed").accuracy.mean().sort_index().to_numpy()


def probe_claims(probes: dict, c: DictConfig) -> tuple[Claim, Claim]:
    runs, chance, th, level = probes["runs"], probes["chance"], c.thresholds, c.level
    colour, self_, no_col, noun = (probes["sets"][0], "self", f"cross: {c.words.no_colour}",
                                   f"cross: {c.words.colour}")
    mean = {s: t_interval(layer_mean(runs, s), level, ACCURACY) for s in probes["sets"]}
    a = Claim("a", "colour is decodable from the colour word's cross-attention maps, far above chance and "
              "above the self-attention maps (Tables 1 vs 2; probe accuracy, mean over layers)", [
                  Check(f"{colour}", mean[colour], ">", th.a_min_ratio_to_chance * chance, percent=True),
                  Check(f"{colour} − self", t_interval(layer_mean(runs, colour) - layer_mean(runs, self_), level,
                                                       DIFFERENCE), ">", th.a_min_margin_over_self, percent=True)],
              numbers={"self": mean[self_].to_dict(), "chance": chance})
    b = Claim("b", f"the map of {c.words.no_colour!r} carries no colour, the map of {c.words.colour!r} some "
              "(Table 3; probe accuracy, mean over layers)", [
                  Check(no_col, mean[no_col], "<", chance + th.b_max_above_chance, percent=True),
                  Check(noun, mean[noun], ">", chance + th.b_min_above_chance, percent=True)],
              numbers={"chance": chance})
    return a, b


def probe_table(probes: dict, level: float) -> tuple[pd.DataFrame, dict]:
    """Rows = probed sets + chance; columns = layers + mean over layers; cells "mean [lo, hi]" in %."""
    runs = probes["runs"]
    table, per_layer = {}, {}
    for s in probes["sets"]:
        sub = runs[runs.set == s]
        cells, by_index = {}, {}
        for label in dict.fromkeys(sub.layer):
            iv = t_interval(sub[sub.layer == label].accuracy.to_numpy(), level, ACCURACY)
            cells[f"L{label.rsplit('-', 1)[1]}"] = iv.format(percent=True)
            by_index[int(label.rsplit("-", 1)[1])] = iv  # labels are "<kind>-<index>"
        cells["mean over layers"] = t_interval(layer_mean(runs, s), level, ACCURACY).format(percent=True)
        table[s], per_layer[s] = cells, by_index
    df = pd.DataFrame(table).T
    df.loc["chance"] = f"{probes['chance'] * 100:.1f}%"
    return df, per_layer


# --------------------------------------------------------------------------- edits (claims c, d)
class EditRows:
    """The rows of a figure's edits: the unedited target, then every row of the ablation ``nodes``
    ((group, node) pairs, rows as :func:`~experiments.tasks.ablation.ablation_rows` makes them); hooks are
    built per batch size (n pairs sampled together by :func:`~editing.two_branch.replacement_edits`)."""

    def __init__(self, pipe, nodes: list[tuple[str, DictConfig]]):
        self.pipe, self.nodes = pipe, nodes
        self._hooks: dict[int, dict[str, dict]] = {}
        first = nodes[0][1]
        self.sampling = (int(first.num_inference_steps), float(first.guidance_scale))
        if any((int(n.num_inference_steps), float(n.guidance_scale)) != self.sampling for _, n in nodes):
            raise UserError("claims.ablations: every ablation of one claim must use the same steps and guidance")
        self.groups = {PLAIN: "plain"}
        for group, node in nodes:
            self.groups.update({label: group for label, _ in ablation_rows(pipe, node)})

    @property
    def labels(self) -> list[str]:
        return list(self.groups)

    def hooks(self, n: int) -> dict[str, dict]:
        """{row label: {layer: hook factory}} for a batch of ``n`` pairs."""
        if n not in self._hooks:
            rows = {PLAIN: {}}
            for _, node in self.nodes:
                rows.update(ablation_rows(self.pipe, node, pairs=pair_rows(n)))
            self._hooks[n] = rows
        return self._hooks[n]


def _with_ranges(node: DictConfig, ranges: list) -> DictConfig:
    node = copy.deepcopy(node)
    with open_dict(node):
        node.ranges = ranges
    return node


def sweep_rows(pipe, c: DictConfig) -> tuple[EditRows, str, str, list[int]]:
    """Every cross and every self range of the model's Fig. 4, plus "all" (cross) and the middle self
    layers (``claims.edits.middle``) when not among them. Returns the rows, the labels of "cross all"
    and of the middle self range, and the middle's layer indices."""
    nodes, picks = [], {}
    for kind, extra in (("cross", "all"), ("self", plain(c.edits.middle))):
        node = c.ablations[kind]
        rows = ablation_rows(pipe, node)
        label, hooks = ablation_rows(pipe, _with_ranges(node, [extra]))[0]
        same = [x for x, h in rows if set(h) == set(hooks)]
        if not same:
            node = _with_ranges(node, [*plain(node.ranges), extra])
        picks[kind] = (same[0] if same else label, sorted(x.index for x in hooks))
        nodes.append((kind, node))
    return EditRows(pipe, nodes), picks["cross"][0], picks["self"][0], picks["self"][1]


def run_edits(rows: EditRows, cases: list[tuple[str, str, int]], checker, batch: int, progress: bool,
              grid_cases: int) -> tuple[pd.DataFrame, list]:
    """Every case × row, ``batch`` cases per sampling call, scored by ``checker``; returns the per-edit
    rows and the edit grid's rows (label, [(image, caption)] for the first ``grid_cases`` cases)."""
    pipe, (steps, guidance) = rows.pipe, rows.sampling
    out_rows, grid = [], {}
    chunks = [list(range(i, min(i + batch, len(cases)))) for i in range(0, len(cases), batch)]
    todo = [(chunk, label) for chunk in chunks for label in rows.labels]
    for chunk, label in tqdm(todo, desc=f"edits ({len(cases)} cases × {len(rows.labels)} rows)", disable=not progress):
        pairs = [cases[i][:2] for i in chunk]
        latents = initial_latents(pipe, [cases[i][2] for i in chunk])  # (n, C, h, w)
        out = replacement_edits(pipe, pairs, latents, rows.hooks(len(chunk))[label], steps, guidance, progress=False)
        images = decode(pipe, out)  # (2n, 3, H, W): source, edited of each case
        for k, i in enumerate(chunk):
            src, tgt, seed = cases[i]
            source, edited = images[2 * k:2 * k + 1], images[2 * k + 1:2 * k + 2]
            scores = checker(src, tgt, source, edited)  # None: the checker cannot read an image (NaN here)
            out_rows.append({"case": i, "source": src, "target": tgt, "seed": seed, "variant": label,
                             "group": rows.groups[label],
                             **{m: math.nan if scores[m] is None else float(scores[m]) for m in METRICS}})
            if i < grid_cases:
                if label == PLAIN:
                    grid.setdefault("source", []).append((source, f"seed {seed}"))
                grid.setdefault(label, []).append((edited, f"seed {seed}"))
    return pd.DataFrame(out_rows), list(grid.items())


def _per_case(df: pd.DataFrame, label: str, metric: str) -> np.ndarray:
    return df[df.variant == label].sort_values("case")[metric].to_numpy()


def scored_interval(values: np.ndarray, c: DictConfig) -> Interval:
    """Bootstrap interval over the cases the checker scored (NaN: an image it could not read — left out,
    not counted as 0; ``Interval.n`` says how many remain)."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return Interval(math.nan, -math.inf, math.inf, 0, "bootstrap")
    return bootstrap_interval(v, c.level, c.edits.bootstrap)


def variant_intervals(df: pd.DataFrame, c: DictConfig) -> dict[str, dict[str, Interval]]:
    return {label: {METRICS[m]: scored_interval(_per_case(df, label, m), c) for m in METRICS}
            for label in dict.fromkeys(df.variant)}


def _diff(df, a: str, b: str, metric: str, c: DictConfig) -> Interval:
    """Bootstrap interval of the per-case difference ``a − b`` (paired by case; cases either side could not
    be scored are left out)."""
    return scored_interval(_per_case(df, a, metric) - _per_case(df, b, metric), c)


def sweep_claim(df: pd.DataFrame, c: DictConfig, cross_all: str, middle: str) -> Claim:
    th = c.thresholds
    return Claim("c", f"cross-attention maps replaced on all layers ({cross_all}) hurt the edit; self-attention "
                 f"maps replaced on the middle layers ({middle}) keep the layout and make the edit (Fig. 4)", [
                     Check(f"edit correct: {PLAIN} − {cross_all}", _diff(df, PLAIN, cross_all, "edit_ok", c), ">",
                           th.c_min_drop_cross_all),
                     Check(f"mask IoU: {middle} − {PLAIN}", _diff(df, middle, PLAIN, "mask_iou", c), ">",
                           th.c_min_iou_gain_middle),
                     Check(f"edit correct: {middle} − {PLAIN}", _diff(df, middle, PLAIN, "edit_ok", c), ">",
                           -th.c_edit_ok_margin_middle)])


def token_claim(df: pd.DataFrame, c: DictConfig) -> Claim:
    labels = [x for x in dict.fromkeys(df.variant) if x != PLAIN]
    return Claim("d", "replacing (<-) or subtracting (-) the cross-attention map of a non-edited word can break "
                 "the edit (Fig. 5; edit-correct drop vs the unedited target)",
                 [Check(f"{PLAIN} − '{x}'", _diff(df, PLAIN, x, "edit_ok", c), ">", c.thresholds.d_min_drop)
                  for x in labels], any_of=True)


def interval_table(rows: dict[str, dict[str, Interval]], df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows = variants, cells "mean [interval]"; with the edits ``df``, a column "not scored" where a
    score is over fewer cases than the row has ("mask IoU over 5 of 6 cases; 1 unreadable")."""
    table = pd.DataFrame({label: {m: iv.format() for m, iv in ms.items()} for label, ms in rows.items()}).T
    if df is not None:
        cases = df.variant.value_counts()
        notes = {label: "; ".join(f"{m} over {iv.n} of {cases[label]} cases; {cases[label] - iv.n} unreadable"
                                  for m, iv in ms.items() if iv.n < cases[label]) for label, ms in rows.items()}
        if any(notes.values()):
            table["not scored"] = pd.Series(notes)
    return table


# --------------------------------------------------------------------------- report
def _md_table(df: pd.DataFrame, index: str) -> str:
    return df.rename_axis(index).to_markdown()


def write_report(out: Path, cfg: DictConfig, claims: list[Claim], sections: list[str], seconds: float) -> Path:
    c = cfg.claims
    lines = [f"# Claims of Liu et al. (CVPR 2024) on model `{cfg.model.name}`", "",
             f"`python -m experiments.run experiment=claims model.path=...`: {cfg.model.steps} steps, guidance "
             f"{cfg.model.guidance_scale}; {c.level:.0%} intervals — probe accuracies: Student-t over "
             f"{len(c.probe.seeds)} probe seeds (each its own random train/test split by image and its own "
             f"initialisation); edits: percentile bootstrap ({c.edits.bootstrap} resamples) over (prompt pair, "
             f"noise seed) cases, differences paired by case. Run time {seconds:.0f} s.", "",
             "| claim | verdict | checks |", "|---|---|---|"]
    for cl in claims:
        detail = cl.skip_reason if cl.skip_reason is not None else "<br>".join(x.format() for x in cl.checks)
        lines.append(f"| ({cl.key}) {cl.title} | **{cl.verdict}** | {detail} |")
    path = out / "claims.md"
    atomic_write_text(path, "\n".join(lines + [""] + sections) + "\n")
    return path


def _save_grid(grid_rows: list, path: Path, cell: int) -> None:
    img = labelled_grid([r for _, r in grid_rows], cell=cell, row_labels=[label for label, _ in grid_rows])
    atomic_save(path, lambda tmp: img.save(tmp, format="PNG"))


def edit_checker(c: DictConfig, name: str, pipe) -> tuple:
    """(checker, None), or (None, why not): ``claims.checkers[<model name>]``, else ``claims.checkers.default``
    (a node with a ``pipe`` key gets the loaded model); a checker whose model (e.g. its CLIP) cannot be
    loaded here leaves claims (c), (d) to SKIP with that reason."""
    node = c.checkers[name] if name in c.checkers else c.checkers.get("default")
    if node is None:
        return None, None
    try:
        return instantiate(node, **({"pipe": pipe} if "pipe" in node else {})), None
    except ModelLoadError as e:
        return None, f"edit checker for model {name!r} unavailable: {first_line(e)}"


def run(cfg: DictConfig) -> dict:
    """Returns ``{"claims": [Claim], "files": {...}}``; prints one line per claim."""
    start = time.perf_counter()
    c = cfg.claims
    pipe = load_model(cfg)
    out = output_dir(cfg)
    name = str(cfg.model.name)
    checker, unavailable = edit_checker(c, name, pipe)
    # everything that can be refused (layer ranges, words, prompts) is refused before any work
    sweep, cross_all, middle, middle_layers = sweep_rows(pipe, c)
    tokens = EditRows(pipe, [("tokens", c.ablations.tokens)])
    pairs = [tuple(p) for p in plain(c.edits.sweep_pairs)]
    check_prompts(pipe.tokenizer, [x for p in pairs for x in p] + [c.ablations.tokens.source_prompt,
                                                                     c.ablations.tokens.target_prompt])

    probes = run_probes(cfg, pipe)
    claim_a, claim_b = probe_claims(probes, c)
    table, per_layer = probe_table(probes, c.level)
    probes["runs"].to_csv(out / "probe_runs.csv", index=False)
    files = {"probe_figure": probe_figure(per_layer, probes["chance"], out / "probe_layers.png",
                                          f"colour probes, model {name} ({probes['n_images']} images, "
                                          f"{probes['n_test']} test per split)")}
    sections = ["## (a), (b): probing (Tables 1–3)", "",
                f"{probes['n_images']} images ({c.probe.n_per_class} per colour), {probes['n_test']} test images "
                f"per split, {len(c.probe.seeds)} probe seeds; test accuracy, mean [{c.level:.0%} t-interval].",
                "", _md_table(table, "probed maps"), "", "![probe accuracy per layer](probe_layers.png)", ""]

    skip = None if checker else unavailable or (f"no edit checker for model {name!r} (claims.checkers has "
                                                f"{list(c.checkers)} and no default)")
    if checker is None:
        claim_c = Claim("c", "Fig. 4: cross maps on all layers hurt the edit; self maps on the middle layers keep "
                        "the layout and make it", skip_reason=skip)
        claim_d = Claim("d", "Fig. 5: a non-edited word's cross map replaced / subtracted can break the edit",
                        skip_reason=skip)
    else:
        seeds, token_seeds = [int(s) for s in c.edits.seeds], [int(s) for s in c.edits.token_seeds]
        sweep_cases = [(s, t, seed) for s, t in pairs for seed in seeds]
        df, grid = run_edits(sweep, sweep_cases, checker, c.edits.batch_size, cfg.progress, c.edits.grid_cases)
        df.to_csv(out / "sweep_edits.csv", index=False)
        ivs = variant_intervals(df, c)
        claim_c = sweep_claim(df, c, cross_all, middle)
        claim_c.numbers = {label: {m: iv.to_dict() for m, iv in ms.items()} for label, ms in ivs.items()}
        panels = {kind: {x: ivs[x] for x in sweep.labels if sweep.groups[x] == kind} for kind in ("cross", "self")}
        files["sweep_figure"] = sweep_figure(panels, ivs[PLAIN], out / "layer_sweep.png",
                                             f"Fig. 4 layer sweep, model {name}, {len(sweep_cases)} cases")
        _save_grid(grid, out / "sweep_grid.png", c.edits.cell)
        t = c.ablations.tokens
        token_cases = [(t.source_prompt, t.target_prompt, seed) for seed in token_seeds]
        tdf, tgrid = run_edits(tokens, token_cases, checker, c.edits.batch_size, cfg.progress, c.edits.grid_cases)
        tdf.to_csv(out / "token_edits.csv", index=False)
        tivs = variant_intervals(tdf, c)
        claim_d = token_claim(tdf, c)
        claim_d.numbers = {label: {m: iv.to_dict() for m, iv in ms.items()} for label, ms in tivs.items()}
        files["token_figure"] = bars_figure(tivs, out / "token_edits.png",
                                            f"Fig. 5 token edits: {t.source_prompt} → {t.target_prompt}")
        _save_grid(tgrid, out / "token_grid.png", c.edits.cell)
        sections += [
            "## (c): the layer sweep (Fig. 4)", "",
            f"Pairs {pairs}, noise seeds {seeds}: {len(sweep_cases)} cases per row. Cross maps replaced on "
            f"{c.ablations.cross.steps} of the steps, self maps on {c.ablations.self.steps}; middle self layers = "
            f"`{plain(c.edits.middle)}` → layers {middle_layers} ({middle}). Edit correct: the target's colour and "
            "shape found in the edited image; mask IoU: object masks of source and edited (1 = layout kept; a case "
            "whose source or edited image the checker cannot read has none: left out, counted). "
            "Mean [bootstrap interval].", "",
            _md_table(interval_table(ivs, df), "rows"), "", "![layer sweep](layer_sweep.png)", "",
            f"![edits of the sweep (rows: variants; columns: the first {c.edits.grid_cases} cases, pair by "
            "pair)](sweep_grid.png)", "",
            "## (d): token edits (Fig. 5)", "",
            f"`{t.source_prompt}` → `{t.target_prompt}`, cross maps of the `{t.layers}` layers on {t.steps} of the "
            f"steps, noise seeds {token_seeds}. Mean [bootstrap interval].",
            "", _md_table(interval_table(tivs, tdf), "rows"), "", "![token edits](token_edits.png)", "",
            "![token edit grid](token_grid.png)", ""]

    claims = [claim_a, claim_b, claim_c, claim_d]
    seconds = time.perf_counter() - start
    files["report"] = write_report(out, cfg, claims, sections, seconds)
    result = {"model": name, "level": c.level, "seconds": seconds, "claims": [x.to_dict() for x in claims],
              "settings": OmegaConf.to_container(c, resolve=True)}
    files["json"] = atomic_write_text(out / "claims.json", json.dumps(result, indent=1, default=str))
    log_claims(cfg, result["claims"], sorted(out.glob("*.png")))
    print(f"\n{table.rename_axis('probed maps').to_markdown()}\n")
    for cl in claims:
        print(cl.line())
    print(f"claims report: {files['report']} ({seconds:.0f} s)")
    return {"claims": claims, "files": files, "seconds": seconds}
