"""The paper's qualitative findings as checkable claims: confidence intervals over seeds, checks of an
interval against a threshold, and a PASS / FAIL / SKIP verdict per claim (``experiment=claims``).

Two intervals, both of the mean over independent repetitions (seeds):

- :func:`t_interval` — Student-t interval, mean ± t_{(1+level)/2, n−1}·s/√n (probe accuracies: one value
  per probe seed, each seed with its own train/test split and initialisation);
- :func:`bootstrap_interval` — percentile bootstrap of the mean (edit outcomes: one value per (prompt
  pair, noise seed) case; 0/1 outcomes make a t-interval meaningless at a few cases). Paired
  comparisons pass the per-case differences.

Fewer than two values give no interval: (−∞, +∞), so no check that needs an interval can pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

VERDICTS = ("PASS", "FAIL", "SKIP")
OPS = {">": "lower bound >", "<": "upper bound <"}


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided ``level`` confidence interval [lo, hi] by ``method``."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str

    def format(self, percent: bool = False) -> str:
        scale, unit, digits = (100.0, "%", 1) if percent else (1.0, "", 3)
        f = lambda v: f"{v * scale:.{digits}f}" if math.isfinite(v) else ("−∞" if v < 0 else "+∞")  # noqa: E731
        return f"{f(self.mean)}{unit} [{f(self.lo)}, {f(self.hi)}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "method": self.method}


def _values(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("an interval needs at least one value")
    return v


def t_interval(values: Sequence[float], level: float = 0.95,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """Student-t interval of the mean of ``values`` (seeds), clipped to the quantity's possible range
    ``bounds`` (e.g. (0, 1) for an accuracy; clipping never lowers the coverage)."""
    v = _values(values)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, -math.inf, math.inf, int(v.size), "t")
    half = float(stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return Interval(mean, max(mean - half, bounds[0]), min(mean + half, bounds[1]), int(v.size), "t")


def bootstrap_interval(values: Sequence[float], level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (cases), ``n_boot`` resamples."""
    v = _values(values)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, -math.inf, math.inf, int(v.size), "bootstrap")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)  # (n_boot,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, float(lo), float(hi), int(v.size), "bootstrap")


@dataclass(frozen=True)
class Check:
    """One condition of a claim: ``interval`` compared with ``threshold`` by ``op``:
    ``">"`` the interval's lower bound is above it, ``"<"`` its upper bound is below it."""

    what: str
    interval: Interval
    op: str
    threshold: float
    percent: bool = False

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"check op {self.op!r} is not one of {list(OPS)}")

    @property
    def passed(self) -> bool:
        i = self.interval
        return i.lo > self.threshold if self.op == ">" else i.hi < self.threshold

    def format(self) -> str:
        t = f"{self.threshold * 100:.1f}%" if self.percent else f"{self.threshold:.3f}"
        return f"{self.what} {self.interval.format(self.percent)} ({OPS[self.op]} {t}: {'ok' if self.passed else 'no'})"

    def to_dict(self) -> dict:
        return {"what": self.what, **self.interval.to_dict(), "op": self.op, "threshold": self.threshold,
                "passed": self.passed}


@dataclass
class Claim:
    """A finding of the paper: PASS when all its checks pass (``any_of``: when one does); SKIP (with
    ``skip_reason``) when it cannot be measured on this model."""

    key: str
    title: str
    checks: list[Check] = field(default_factory=list)
    any_of: bool = False
    skip_reason: str | None = None
    numbers: dict = field(default_factory=dict)  # further numbers for the report (not judged)

    @property
    def verdict(self) -> str:
        if self.skip_reason is not None:
            return "SKIP"
        if not self.checks:
            return "FAIL"
        passed = [c.passed for c in self.checks]
        return "PASS" if (any(passed) if self.any_of else all(passed)) else "FAIL"

    def line(self) -> str:
        """One line: ``claim (a) PASS — <title>: <check>; <check>``."""
        head = f"claim ({self.key}) {self.verdict} — {self.title}"
        if self.skip_reason is not None:
            return f"{head}: {self.skip_reason}"
        joiner = " OR " if self.any_of else "; "
        return f"{head}: " + joiner.join(c.format() for c in self.checks)

    def to_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "verdict": self.verdict, "any_of": self.any_of,
                "skip_reason": self.skip_reason, "checks": [c.to_dict() for c in self.checks],
                "numbers": self.numbers}
