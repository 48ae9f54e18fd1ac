"""constraints/minimum.txt pins every dependency pyproject.toml declares at exactly its floor (CI runs the
suite with it, so a floor raised or lowered in one file and not the other would go untested)."""

import re

import pytest

from tests.conftest import ROOT

UNTESTED_FLOORS = {"torch"}  # CI keeps the CPU wheel 2.13.0: older torch is only a multi-GB CUDA download


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _release(version: str, length: int = 4) -> tuple[int, ...]:
    """'5.6' → (5, 6, 0, 0): equal releases compare equal however many parts they are written with."""
    parts = [int(x) for x in version.split(".")]
    return tuple(parts + [0] * (length - len(parts)))


def test_minimum_constraints_pin_every_declared_floor():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for line in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(?:,<[0-9.]+)?", line).groups()
        declared[_name(name)] = floor
    pins = {}
    for line in (ROOT / "constraints" / "minimum.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    assert set(pins) == set(declared) - UNTESTED_FLOORS
    for name, version in pins.items():
        assert _release(version) == _release(declared[name]), f"{name}: pinned {version}, declared >={declared[name]}"
