"""experiment=claims: the interval and verdict logic, the random probe splits, and small runs on the toy
model (every claim measured, pixel checker) and on the tiny SD-layout model (every claim measured with
the generic checker; edit claims skipped, with the reason, when its CLIP cannot be loaded)."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from evaluation.claims import Check, Claim, Interval, bootstrap_interval, t_interval
from experiments.run import dispatch
from probing.probe_runs import random_split

SMALL = ["model.steps=2", "claims.probe.n_per_class=2", "claims.probe.seeds=[0,1]", "claims.edits.seeds=[0]",
         "claims.edits.token_seeds=[0,1]",
         "claims.edits.bootstrap=200", "trainer.max_epochs=1", "logger=none"]


def test_t_interval_is_the_student_t_interval():
    iv = t_interval([0.5, 0.7, 0.9], level=0.95)
    half = stats.t.ppf(0.975, 2) * 0.2 / math.sqrt(3)
    assert iv.method == "t" and iv.n == 3
    assert iv.mean == pytest.approx(0.7) and (iv.lo, iv.hi) == (pytest.approx(0.7 - half), pytest.approx(0.7 + half))
    assert t_interval([0.5, 0.7, 0.9], level=0.5).hi < iv.hi  # a lower level gives a narrower interval
    clipped = t_interval([0.9, 1.0, 1.0], bounds=(0.0, 1.0))  # an accuracy: the interval stays inside [0, 1]
    assert clipped.hi == 1.0 and clipped.lo == t_interval([0.9, 1.0, 1.0]).lo < 0.9
    one = t_interval([0.8])
    assert one.mean == 0.8 and (one.lo, one.hi) == (-math.inf, math.inf)  # one seed: no interval


def test_bootstrap_interval():
    assert (bootstrap_interval([1.0] * 6).lo, bootstrap_interval([1.0] * 6).hi) == (1.0, 1.0)
    v = [0, 1, 1, 0, 1, 1, 1, 0]
    iv = bootstrap_interval(v, level=0.9, n_boot=4000, seed=1)
    assert iv.lo < np.mean(v) < iv.hi and 0 <= iv.lo and iv.hi <= 1 and iv.method == "bootstrap"
    assert bootstrap_interval(v, level=0.9, n_boot=4000, seed=1) == iv  # seeded
    assert math.isinf(bootstrap_interval([0.3]).lo)


def test_checks_and_verdicts():
    iv = Interval(mean=0.6, lo=0.4, hi=0.8, n=5, method="t")
    assert Check("x", iv, ">", 0.39).passed and not Check("x", iv, ">", 0.4).passed  # strict: the bound must clear it
    assert Check("x", iv, "<", 0.81).passed and not Check("x", iv, "<", 0.8).passed
    with pytest.raises(ValueError):
        Check("x", iv, ">=", 0.5)
    ok, bad = Check("ok", iv, ">", 0.1), Check("bad", iv, ">", 0.9)
    assert Claim("a", "t", [ok, ok]).verdict == "PASS"
    assert Claim("a", "t", [ok, bad]).verdict == "FAIL"
    assert Claim("d", "t", [bad, ok], any_of=True).verdict == "PASS"
    assert Claim("d", "t", [bad, bad], any_of=True).verdict == "FAIL"
    assert Claim("c", "t", []).verdict == "FAIL"  # nothing measured is no pass
    skipped = Claim("c", "t", [ok], skip_reason="no checker")
    assert skipped.verdict == "SKIP" and skipped.line() == "claim (c) SKIP — t: no checker"
    line = Claim("a", "title", [ok, bad]).line()
    assert line.startswith("claim (a) FAIL — title: ok 0.600 [0.400, 0.800]") and "(lower bound > 0.900: no)" in line
    no_interval = Check("one seed", t_interval([0.99]), ">", 0.1)
    assert not no_interval.passed and "[−∞, +∞]" in no_interval.format()
    assert "99.0% [" in Check("p", t_interval([0.99, 0.99]), ">", 0.1, percent=True).format()


def test_cases_the_checker_cannot_read_are_left_out_and_counted():
    """Issue 23 item 5 in the claims: a case with no mask IoU (None from the toy checker → NaN) is not a 0
    in the interval nor in the paired differences, and the table says how many cases remain."""
    import pandas as pd

    from editing.ablation import PLAIN
    from evaluation.paper_claims import interval_table, paired_diff, variant_intervals

    df = pd.DataFrame({"case": [0, 1, 2, 0, 1, 2], "variant": [PLAIN] * 3 + ["self 2-5"] * 3,
                       "edit_ok": [1.0, 1.0, 0.0, 1.0, 1.0, 1.0], "mask_iou": [0.5, math.nan, 0.7, 0.9, 0.8, 0.9]})
    ivs = variant_intervals(df, 0.95, 200)
    iou = ivs[PLAIN]["mask IoU source↔edited"]
    assert iou.n == 2 and iou.mean == pytest.approx(0.6)  # not (0.5 + 0 + 0.7) / 3
    assert ivs[PLAIN]["edit correct"].n == 3
    assert paired_diff(df, "self 2-5", PLAIN, "mask_iou", 0.95, 200).n == 2  # paired: case 1 left out on both sides
    table = interval_table(ivs, df)
    assert table.loc[PLAIN, "not scored"] == "mask IoU source↔edited over 2 of 3 cases; 1 unreadable"
    assert table.loc["self 2-5", "not scored"] == ""


def test_random_split_holds_out_the_same_image_seeds_in_every_class():
    seeds = [k for _ in "abc" for k in range(8)]  # 3 classes × image seeds 0..7
    splits = [random_split(seeds, 2, s) for s in range(4)]
    for train in splits:
        test_seeds = [sorted(k for t, k in zip(train.tolist(), seeds[i * 8:(i + 1) * 8]) if not t) for i in range(3)]
        assert len(test_seeds[0]) == 2 and test_seeds[0] == test_seeds[1] == test_seeds[2]
    assert len({tuple(s.tolist()) for s in splits}) > 1  # probe seeds draw different test images
    assert random_split(seeds, 2, 3).tolist() == splits[3].tolist()


def _read(out):
    data = json.loads((out / "claims.json").read_text())
    md = (out / "claims.md").read_text()
    return data, md


def test_claims_run_on_the_toy_model(compose_cfg, tmp_path, capsys):
    res = dispatch(compose_cfg("model=toy", "experiment=claims", *SMALL))
    out = tmp_path / "out"
    data, md = _read(out)
    assert [c["key"] for c in data["claims"]] == ["a", "b", "c", "d"]
    verdicts = [c["verdict"] for c in data["claims"]]
    assert all(v in ("PASS", "FAIL") for v in verdicts)  # the toy world has a checker: nothing skipped
    printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("claim (")]
    assert [x.split()[2] for x in printed] == verdicts and printed == [c.line() for c in res["claims"]]
    for v, key in zip(verdicts, "abcd"):
        assert f"| ({key}) " in md and f"**{v}**" in md
    sweep = data["claims"][2]["numbers"]
    assert {"target (no edit)", "cross all", "self all"} <= set(sweep)  # the model's figure ranges, toy numbering
    assert {"cross 1-2", "self 2-5"} <= set(sweep) and not any("16" in k for k in sweep)
    for name in ("probe_layers.png", "layer_sweep.png", "token_edits.png", "sweep_grid.png", "token_grid.png",
                 "probe_runs.csv", "sweep_edits.csv"):
        assert (out / name).stat().st_size > 0 and f"({name})" in md or name.endswith(".csv")
    assert data["claims"][0]["checks"][0]["n"] == 2  # one value per probe seed


def test_claims_on_an_sd_layout_model_give_four_verdicts(compose_cfg, tmp_path):
    """tiny (SD-1.x layout, random weights): probes on the SD layers; edits scored by the generic checker
    (claims.checkers.default: CLIP zero-shot and the model's prompt gain + object masks; here a tiny random CLIP)."""
    dispatch(compose_cfg("model=tiny", "experiment=claims", *SMALL, "claims.checkers.default.clip=tiny-random",
                         "claims.checkers.default.num_maps_per_mask=2"))
    data, md = _read(tmp_path / "out")
    verdicts = {c["key"]: c["verdict"] for c in data["claims"]}
    assert set(verdicts.values()) <= {"PASS", "FAIL"} and list(verdicts) == ["a", "b", "c", "d"]
    rows = data["claims"][2]["numbers"]
    assert {"target (no edit)", "cross all"} <= set(rows)
    for label, metrics in rows.items():  # every edit row scored: edit correct in [0, 1], mask IoU in [0, 1]
        for m in ("edit correct", "mask IoU source↔edited"):
            assert 0.0 <= metrics[m]["mean"] <= 1.0, (label, m)
    header = next(x for x in md.splitlines() if x.startswith("| probed maps"))
    assert [x.strip() for x in header.split("|")[2:-1]] == \
        ["L3", "L6", "L9", "L10", "L12", "L14", "L16", "mean over layers"]  # the SD-1.x paper columns


def test_claims_skip_the_edit_claims_when_the_checker_cannot_load(compose_cfg, tmp_path):
    """A checker whose CLIP is not here (SD-1.x's CLIP offline): (c), (d) SKIP with the reason, (a), (b) run."""
    missing = tmp_path / "no-clip-here"
    dispatch(compose_cfg("model=tiny", "experiment=claims", *SMALL, f"claims.checkers.default.clip={missing}"))
    data, md = _read(tmp_path / "out")
    verdicts = {c["key"]: c["verdict"] for c in data["claims"]}
    assert verdicts["c"] == verdicts["d"] == "SKIP" and verdicts["a"] in ("PASS", "FAIL")
    assert "edit checker for model 'tiny' unavailable" in md and "no-clip-here" in md


def test_batched_replacement_edits_equal_one_pair_at_a_time(tiny_pipe):
    """Cases sampled together (claims' ``edits.batch``) give the edits sampled one by one."""
    import torch

    from editing.replace import AttentionReplace
    from editing.two_branch import model_layers, pair_rows, replacement_edit, replacement_edits
    from sdattn.layers import select_layers
    from sdattn.sampling import initial_latents

    chosen = select_layers(model_layers(tiny_pipe), "4-14", "self")
    steps = {0, 1}

    def hooks(pairs):
        return {x: (lambda lay, st: AttentionReplace(lay, st, pairs, steps)) for x in chosen}

    pairs = [("a red car", "a blue car"), ("a black car", "a white car")]
    together = replacement_edits(tiny_pipe, pairs, initial_latents(tiny_pipe, [3, 4]), hooks(pair_rows(2)), 2, 7.5,
                                 progress=False)
    alone = torch.cat([replacement_edit(tiny_pipe, s, t, initial_latents(tiny_pipe, [seed]), hooks(pair_rows(1)), 2,
                                        7.5, progress=False) for (s, t), seed in zip(pairs, [3, 4])])
    plain = replacement_edit(tiny_pipe, *pairs[0], initial_latents(tiny_pipe, [3]), {}, 2, 7.5, progress=False)
    assert together.shape == alone.shape == (4, *plain.shape[1:])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(alone[1], plain[1], atol=1e-3)  # the hooks did edit the target


@pytest.mark.parametrize("override,message", [
    ("claims.edits.batch_size=0", "claims.edits.batch_size=0: allowed an integer ≥ 1"),
    ("claims.edits.bootstrap=0", "claims.edits.bootstrap=0: allowed an integer ≥ 1"),
    ("claims.ablations.self.steps=1.5", "claims.ablations.self.steps=1.5 is outside [0, 1]"),
    ("claims.probe.seeds=[]", "claims.probe.seeds=[] is empty"),
])
def test_bad_claims_settings_are_one_line_before_anything_runs(override, message):
    from experiments.cli import check_command_line
    from sdattn.errors import UserError

    with pytest.raises(UserError) as e:
        check_command_line(["experiment=claims", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_steps_of_any_ablation_node_are_fractions_and_other_steps_are_not():
    """The rule is on the path: ``steps`` of every node under claims.ablations (a new one included) is a
    fraction; model.steps (a step count) and probe.steps (step indices) are not."""
    from experiments.cli import check_command_line
    from sdattn.errors import UserError

    extra = ["experiment=claims", "+ablation@claims.ablations.extra=fig4_self"]  # an ablation not in claims.yaml
    with pytest.raises(UserError, match=r"^claims\.ablations\.extra\.steps=1\.5 is outside \[0, 1\]"):
        check_command_line([*extra, "claims.ablations.extra.steps=1.5"])
    check_command_line([*extra, "claims.ablations.extra.steps=[0.2,0.6]", "model.steps=25"])
    check_command_line(["experiment=fig4_cross", "model.steps=25"])
    check_command_line(["probe=cross_attn", "probe.steps=[0,1]"])
