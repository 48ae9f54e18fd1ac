"""``experiment=claims``: each qualitative finding of Liu et al. checked on the model, with numbers,
confidence intervals over seeds and a PASS / FAIL / SKIP verdict (:mod:`evaluation.paper_claims`).

Probes (claims a, b) share the probe task's feature cache and Lightning probes (:mod:`probing.probe_runs`);
edits (claims c, d) sample the ablation rows (:mod:`editing.ablation`) and score them with the model's
checker (``claims.checkers``: the toy world's pixel checker, else :mod:`evaluation.edit_check`).
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig, OmegaConf

from editing.ablation import PLAIN, Ablation, EditRows, sweep_rows
from evaluation import claims_report as report
from evaluation import paper_claims as pc
from evaluation.claims_plots import bars_figure, probe_figure, sweep_figure
from experiments.common import instantiate, load_model, model_fingerprint, model_identity, output_dir, plain
from experiments.tracking import log_claims
from probing.features import FeatureCache
from probing.probe_runs import probe_runs, probe_sets
from probing.prompts import family_file, load_family
from sdattn.errors import ModelLoadError, first_line
from sdattn.files import atomic_write_text
from sdattn.sampling import check_prompts


def edit_checker(c: DictConfig, name: str, pipe) -> tuple:
    """(checker, None), or (None, why not): ``claims.checkers[<model name>]``, else ``claims.checkers.default``
    (a node with a ``pipe`` key gets the loaded model); a checker whose model (e.g. its CLIP) cannot be
    loaded here leaves claims (c), (d) to SKIP with that reason."""
    node = c.checkers[name] if name in c.checkers else c.checkers.get("default")
    if node is None:
        return None, f"no edit checker for model {name!r} (claims.checkers has {list(c.checkers)} and no default)"
    try:
        return instantiate(node, **({"pipe": pipe} if "pipe" in node else {})), None
    except ModelLoadError as e:
        return None, f"edit checker for model {name!r} unavailable: {first_line(e)}"


def run(cfg: DictConfig) -> dict:
    """Returns ``{"claims": [Claim], "files": {...}}``; prints one line per claim."""
    start = time.perf_counter()
    c = plain(cfg.claims)
    e, th, level, n_boot = c["edits"], c["thresholds"], c["level"], c["edits"]["bootstrap"]
    pipe, out, name = load_model(cfg), output_dir(cfg), str(cfg.model.name)
    checker, skip = edit_checker(cfg.claims, name, pipe)
    # everything that can be refused (layer ranges, words, prompts) is refused before any work
    ab = {k: Ablation.from_settings(v) for k, v in c["ablations"].items()}
    sweep, cross_all, middle, middle_layers = sweep_rows(pipe, ab["cross"], ab["self"], e["middle"])
    tokens = EditRows(pipe, [("tokens", ab["tokens"])])
    pairs = [tuple(p) for p in e["sweep_pairs"]]
    check_prompts(pipe.tokenizer, [x for p in pairs for x in p] + [ab["tokens"].source_prompt,
                                                                     ab["tokens"].target_prompt])
    p = c["probes"]
    sets = probe_sets(p["cross"], p["self"], p["tokens"], c["words"]["no_colour"], c["words"]["colour"])

    family = load_family(family_file(str(p["cross"]["family"]), cfg.paths.data_dir))
    cache = FeatureCache(cfg.paths.cache_dir, model_identity(cfg), model_fingerprint(cfg, pipe))
    probes = probe_runs(pipe, sets, family, p["cross"]["classes"], c["probe"]["n_per_class"],
                        c["probe"]["test_fraction"], c["probe"]["seeds"], instantiate(cfg.trainer), cache,
                        bool(cfg.progress))
    claim_a, claim_b = pc.probe_claims(probes, c["words"]["no_colour"], c["words"]["colour"], th, level)
    table, per_layer = pc.probe_table(probes, level)
    probes["runs"].to_csv(out / "probe_runs.csv", index=False)
    files = {"probe_figure": probe_figure(per_layer, probes["chance"], out / "probe_layers.png",
                                          f"colour probes, model {name} ({probes['n_images']} images, "
                                          f"{probes['n_test']} test per split)")}
    sections = report.probe_section(probes, table, c["probe"]["n_per_class"], len(c["probe"]["seeds"]), level)

    if checker is None:
        claim_c, claim_d = pc.skipped_edit_claims(skip)
    else:
        def edits(rows: EditRows, cases: list, stem: str):  # → (edits, intervals); writes <stem>_edits.csv, grid
            df, grid = pc.run_edits(rows, cases, checker, e["batch_size"], bool(cfg.progress), e["grid_cases"])
            df.to_csv(out / f"{stem}_edits.csv", index=False)
            report.save_grid(grid, out / f"{stem}_grid.png", e["cell"])
            return df, pc.variant_intervals(df, level, n_boot)

        df, ivs = edits(sweep, [(s, t, seed) for s, t in pairs for seed in e["seeds"]], "sweep")
        claim_c = pc.sweep_claim(df, cross_all, middle, th, level, n_boot)
        claim_c.numbers = pc.interval_numbers(ivs)
        panels = {kind: {x: ivs[x] for x in sweep.labels if sweep.groups[x] == kind} for kind in ("cross", "self")}
        files["sweep_figure"] = sweep_figure(panels, ivs[PLAIN], out / "layer_sweep.png",
                                             f"Fig. 4 layer sweep, model {name}, {len(pairs) * len(e['seeds'])} cases")
        t = ab["tokens"]
        tdf, tivs = edits(tokens, [(t.source_prompt, t.target_prompt, seed) for seed in e["token_seeds"]], "token")
        claim_d = pc.token_claim(tdf, th["d_min_drop"], level, n_boot)
        claim_d.numbers = pc.interval_numbers(tivs)
        files["token_figure"] = bars_figure(tivs, out / "token_edits.png",
                                            f"Fig. 5 token edits: {t.source_prompt} → {t.target_prompt}")
        sections += report.sweep_section(ivs, df, pairs, e["seeds"], ab["cross"].steps, ab["self"].steps, e["middle"],
                                         middle_layers, middle, e["grid_cases"])
        sections += report.token_section(tivs, tdf, t.source_prompt, t.target_prompt, t.layers, t.steps,
                                         e["token_seeds"])

    claims = [claim_a, claim_b, claim_c, claim_d]
    seconds = time.perf_counter() - start
    files["report"] = report.write_report(out, name, cfg.model.steps, cfg.model.guidance_scale, level,
                                          len(c["probe"]["seeds"]), n_boot, claims, sections, seconds)
    result = {"model": name, "level": level, "seconds": seconds, "claims": [x.to_dict() for x in claims],
              "settings": OmegaConf.to_container(cfg.claims, resolve=True)}
    files["json"] = atomic_write_text(out / "claims.json", json.dumps(result, indent=1, default=str))
    log_claims(cfg, result["claims"], sorted(out.glob("*.png")))
    print(f"\n{table.rename_axis('probed maps').to_markdown()}\n")
    for cl in claims:
        print(cl.line())
    print(f"claims report: {files['report']} ({seconds:.0f} s)")
    return {"claims": claims, "files": files, "seconds": seconds}
