"""The one step spec (sdattn.steps): step indices and fractions of the run, parsed in one place."""

import pytest

from sdattn.errors import UserError
from sdattn.steps import StepSpec, parse_steps


@pytest.mark.parametrize("spec,numbers,expected", [
    ("all", "index", set(range(10))), (None, "fraction", set(range(10))), ("none", "fraction", set()),
    ("0-2", "index", {0, 1, 2}), ("0-2", "fraction", {0, 1, 2}), ("1,4, 6-7", "index", {1, 4, 6, 7}),
    ([1, 3], "index", {1, 3}), ([0, "5-6"], "fraction", {0, 5, 6}), (3, "index", {3}),
    (0.8, "fraction", set(range(8))), (1, "fraction", set(range(10))), (0, "fraction", set()),
    ([0.2, 0.5], "fraction", {2, 3, 4}), ([0, 1], "fraction", set(range(10))), ([0, 1], "index", {0, 1}),
])
def test_both_dialects(spec, numbers, expected):
    assert parse_steps(spec, 10, numbers) == expected


def test_fractions_truncate_as_the_official_code():
    assert parse_steps(0.5, 3, "fraction") == {0}  # int(1.5) = 1 step (round() would give 2)
    assert parse_steps([0.5, 1.0], 3, "fraction") == {1, 2}
    assert parse_steps(0.8, 50, "fraction") == set(range(40)) and parse_steps(0.2, 7, "fraction") == {0}


@pytest.mark.parametrize("spec,numbers,match", [
    (1.5, "fraction", r"probe.steps=1.5 is outside \[0, 1\]"), ([0.6, 0.2], "fraction", "0 ≤ start ≤ end ≤ 1"),
    ("x", "fraction", "is not a fraction"), ([0.1, True], "fraction", "is not a fraction"),
    (0.5, "index", "is not a step spec"), ("3-1", "index", "empty"), (-1, "index", "negative"),
    (True, "index", "is not a step spec"),
])
def test_bad_specs_name_the_setting(spec, numbers, match):
    with pytest.raises(UserError, match=match):
        StepSpec.parse(spec, numbers, key="probe.steps")


def test_steps_past_the_run_are_refused_when_resolved():
    spec = StepSpec.parse("2-5", key="attention_maps.cross_steps")  # model-free: fine
    assert spec.resolve(6) == {2, 3, 4, 5}
    with pytest.raises(UserError, match=r"attention_maps.cross_steps: step 4 is outside 0..3"):
        spec.resolve(4)
