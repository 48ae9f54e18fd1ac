"""The paper's four findings measured (``experiment=claims``; the statistics: :mod:`evaluation.claims`):

(a) Table 1 vs 2: the colour is decodable from the colour word's cross-attention maps, far above chance
    and above the self-attention maps.   (b) Table 3: the map of "a" carries no colour, the noun's some.
(c) Fig. 4: cross-attention maps replaced on all layers hurt the edit; self-attention maps replaced on
    the middle layers keep the layout and make the edit.
(d) Fig. 5: replacing or subtracting a non-edited word's cross-attention map can break the edit.

(a), (b) read probe runs (:func:`probing.probe_runs.probe_runs`); (c), (d) read edits of the ablation rows
(:class:`editing.ablation.EditRows`) scored by an edit checker: ``checker(source_prompt, target_prompt, source,
edited) -> {"edit_ok": 0/1, "mask_iou": IoU}`` (None where it cannot read an image)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from editing.ablation import PLAIN, EditRows
from editing.two_branch import replacement_edits
from sdattn.sampling import decode, initial_latents

from .claims import Check, Claim, Interval, bootstrap_interval, t_interval

METRICS = {"edit_ok": "edit correct", "mask_iou": "mask IoU source↔edited"}
ACCURACY, DIFFERENCE = (0.0, 1.0), (-1.0, 1.0)  # possible ranges: intervals are clipped to them


# --------------------------------------------------------------------------- probes (claims a, b)
def layer_mean(runs: pd.DataFrame, name: str) -> np.ndarray:
    """Per probe seed: the accuracy of set ``name`` averaged over its layers (the tables' Avg)."""
    return runs[runs.set == name].groupby("seed").accuracy.mean().sort_index().to_numpy()


def probe_claims(probes: dict, no_colour: str, colour: str, thresholds: dict, level: float) -> tuple[Claim, Claim]:
    """Claims (a) and (b) from :func:`~probing.probe_runs.probe_runs` (its first set: the colour word)."""
    runs, chance, th = probes["runs"], probes["chance"], thresholds
    colour_word, self_, no_col, noun = probes["sets"][0], "self", f"cross: {no_colour}", f"cross: {colour}"
    mean = {s: t_interval(layer_mean(runs, s), level, ACCURACY) for s in probes["sets"]}
    a = Claim("a", "colour is decodable from the colour word's cross-attention maps, far above chance and "
              "above the self-attention maps (Tables 1 vs 2; probe accuracy, mean over layers)", [
                  Check(f"{colour_word}", mean[colour_word], ">", th["a_min_ratio_to_chance"] * chance, percent=True),
                  Check(f"{colour_word} − self",
                        t_interval(layer_mean(runs, colour_word) - layer_mean(runs, self_), level, DIFFERENCE), ">",
                        th["a_min_margin_over_self"], percent=True)],
              numbers={"self": mean[self_].to_dict(), "chance": chance})
    b = Claim("b", f"the map of {no_colour!r} carries no colour, the map of {colour!r} some "
              "(Table 3; probe accuracy, mean over layers)", [
                  Check(no_col, mean[no_col], "<", chance + th["b_max_above_chance"], percent=True),
                  Check(noun, mean[noun], ">", chance + th["b_min_above_chance"], percent=True)],
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


def scored_interval(values: np.ndarray, level: float, n_boot: int) -> Interval:
    """Bootstrap interval (``n_boot`` resamples) over the cases the checker scored (NaN: an image it could not
    read — left out, not counted as 0; ``Interval.n`` says how many remain)."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return Interval(math.nan, -math.inf, math.inf, 0, "bootstrap")
    return bootstrap_interval(v, level, n_boot)


def variant_intervals(df: pd.DataFrame, level: float, n_boot: int) -> dict[str, dict[str, Interval]]:
    """{row label: {metric name: interval}} of the edits ``df`` (:func:`run_edits`)."""
    return {label: {METRICS[m]: scored_interval(_per_case(df, label, m), level, n_boot) for m in METRICS}
            for label in dict.fromkeys(df.variant)}


def paired_diff(df: pd.DataFrame, a: str, b: str, metric: str, level: float, n_boot: int) -> Interval:
    """Bootstrap interval of the per-case difference ``a − b`` (paired by case; cases either side could not
    be scored are left out)."""
    return scored_interval(_per_case(df, a, metric) - _per_case(df, b, metric), level, n_boot)


def sweep_claim(df: pd.DataFrame, cross_all: str, middle: str, thresholds: dict, level: float, n_boot: int) -> Claim:
    """Claim (c) from the layer sweep's edits (rows ``cross_all`` and ``middle`` among them)."""
    th = thresholds

    def diff(a: str, b: str, metric: str) -> Interval:
        return paired_diff(df, a, b, metric, level, n_boot)

    return Claim("c", f"cross-attention maps replaced on all layers ({cross_all}) hurt the edit; self-attention "
                 f"maps replaced on the middle layers ({middle}) keep the layout and make the edit (Fig. 4)", [
                     Check(f"edit correct: {PLAIN} − {cross_all}", diff(PLAIN, cross_all, "edit_ok"), ">",
                           th["c_min_drop_cross_all"]),
                     Check(f"mask IoU: {middle} − {PLAIN}", diff(middle, PLAIN, "mask_iou"), ">",
                           th["c_min_iou_gain_middle"]),
                     Check(f"edit correct: {middle} − {PLAIN}", diff(middle, PLAIN, "edit_ok"), ">",
                           -th["c_edit_ok_margin_middle"])])


def token_claim(df: pd.DataFrame, min_drop: float, level: float, n_boot: int) -> Claim:
    """Claim (d) from the token edits: one of them drops edit-correct by more than ``min_drop``."""
    labels = [x for x in dict.fromkeys(df.variant) if x != PLAIN]
    return Claim("d", "replacing (<-) or subtracting (-) the cross-attention map of a non-edited word can break "
                 "the edit (Fig. 5; edit-correct drop vs the unedited target)",
                 [Check(f"{PLAIN} − '{x}'", paired_diff(df, PLAIN, x, "edit_ok", level, n_boot), ">", min_drop)
                  for x in labels], any_of=True)


def skipped_edit_claims(reason: str) -> tuple[Claim, Claim]:
    """Claims (c) and (d) when no edit checker is available here (``reason``)."""
    return (Claim("c", "Fig. 4: cross maps on all layers hurt the edit; self maps on the middle layers keep "
                  "the layout and make it", skip_reason=reason),
            Claim("d", "Fig. 5: a non-edited word's cross map replaced / subtracted can break the edit",
                  skip_reason=reason))


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


def interval_numbers(ivs: dict[str, dict[str, Interval]]) -> dict:
    """A claim's further numbers: every row's intervals as dicts."""
    return {label: {m: iv.to_dict() for m, iv in ms.items()} for label, ms in ivs.items()}
