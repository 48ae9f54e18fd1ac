"""Table 5 in the paper's layout: experiment=table5 on the toy sets (configured column groups, both time
columns, "–" where a method has no such setting), compare_paper, and the layout's config errors."""

import pytest

from evaluation.tables import TIME, Table5Group, load_paper_table5, table5, table5_groups
from experiments.run import dispatch
from sdattn.errors import UserError

COLUMNS = ["Toy world fake CS", "Toy world fake CDS", "Toy world real CS", "Toy world real CDS",
           f"{TIME} fake", f"{TIME} real"]


@pytest.fixture
def table5_run(compose_cfg, tiny_pipe, tmp_path, monkeypatch):
    import experiments.tasks.benchmark as task

    monkeypatch.setattr(task, "load_model", lambda cfg: tiny_pipe)

    def _run(method, data, *overrides):
        return dispatch(compose_cfg("experiment=table5", f"method={method}", f"data={data}", "data.limit=2",
                                    "model.steps=2", "metrics.clip=tiny-random", "logger=none",
                                    f"paths.log_dir={tmp_path / 'logs'}", *overrides))

    return _run


def test_table5_on_the_toy_sets_in_the_paper_layout(table5_run, tmp_path, capsys):
    for method in ("fpe", "shape_guided"):
        for data in ("toy_fake_edit", "toy_real_edit"):
            res = table5_run(method, data)
    t, files, cap = res["tables"]["table5"]
    assert list(t.index) == ["Shape-Guided", "FPE"]  # the paper's row order and labels
    assert list(t.columns) == COLUMNS
    assert t.loc["Shape-Guided", "Toy world fake CS"] == "–" and t.loc["Shape-Guided", f"{TIME} fake"] == "–"
    for col in COLUMNS:  # FPE has every setting; Shape-Guided the real ones
        assert t.loc["FPE", col] != "–" and " ± " in t.loc["FPE", col]
    assert " ± " in t.loc["Shape-Guided", "Toy world real CDS"] and " ± " in t.loc["Shape-Guided", f"{TIME} real"]
    assert files["md"] == tmp_path / "logs/benchmark/tiny/table5.md" and "CS = CLIP score" in cap
    skipped = capsys.readouterr().out
    assert "shape_guided runs on real images only (as in the paper)" in skipped  # generated pairs: skipped
    res = table5_run("fpe", "toy_fake_edit", "benchmark.compare_paper=true")  # resumed: tables only
    t = res["tables"]["table5"][0]
    assert list(t.columns) == COLUMNS
    # no toy group maps to a paper group: ours alone, the paper's whole table beside it (tests/test_paper_tables.py)
    assert not any("(" in c for c in t.to_numpy().ravel()) and res["tables"]["paper"][0].shape == (9, 10)


def test_paper_numbers_beside_ours_in_the_paper_groups():
    paper = load_paper_table5()
    rows = {"ds_real": {"fpe": [{"clip_score": 20.0, "clip_directional": 0.1, "time_s": 4.0}]}}
    groups = [Table5Group("Wild-TI2I", real="ds_real", paper="Wild-TI2I")]
    t = table5(rows, groups, paper)
    assert t.loc["FPE", f"{TIME} real"] == f"4.00 ± 0.00 ({paper['methods']['fpe']['time_s']['real']:.2f})"
    assert t.loc["FPE", f"{TIME} fake"] == "– (6.30)"
    assert t.loc["FPE", "Wild-TI2I real CS"] == "20.00 ± 0.00 (29.04)"
    assert t.loc["FPE", "Wild-TI2I real CDS"] == "0.1000 ± 0.0000 (0.2234)"  # CDS with 4 digits, as the paper
    assert list(t.columns) == ["Wild-TI2I real CS", "Wild-TI2I real CDS", f"{TIME} fake", f"{TIME} real"]


@pytest.mark.parametrize("groups, match", [
    ([], "non-empty list"),
    ([{"fake": "a"}], "needs a label"),
    ([{"label": "x"}], "names no dataset"),
    ([{"label": "x", "fake": "a", "kind": "b"}], r"groups\[0\].kind is not a key"),
])
def test_bad_layout_is_one_line(groups, match):
    with pytest.raises(UserError, match=match):
        table5_groups(groups)
