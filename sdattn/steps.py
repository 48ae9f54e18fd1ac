"""Which sampling steps a hook or a recorder acts on: one spec, parsed here for every method and observer.

A step spec is written as

- ``"all"`` (or null) / ``"none"``;
- 0-based step indices: ``"a-b"`` (inclusive), ``"a,b,c"``, or a list of indices and ranges;
- fractions of the run: ``f`` in [0, 1] → the first ``int(f·N)`` steps; ``[a, b]`` → steps
  ``int(a·N) .. int(b·N) − 1`` (truncated, as the official P2P / FPE code counts).

Bare numbers (``0.8``, ``3``, ``[0, 1]``) mean fractions for editing windows (``numbers="fraction"``:
``self_replace_steps=0.8``, ``1`` = every step) and step indices for observation (``numbers="index"``:
``probe.steps=[1, 3]``); strings mean the same everywhere.
"""

from __future__ import annotations

import math
import numbers as _numbers
import re
from dataclasses import dataclass

from .errors import UserError

NUMBERS = ("fraction", "index")
_ITEM = re.compile(r"(\d+)\s*-\s*(\d+)|(\d+)")


def _is_number(x) -> bool:
    return isinstance(x, _numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, _numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class StepSpec:
    """Parsed, model-free: step ``indices`` (0-based) or, when they are None, a ``window`` [start, end)
    of fractions of the run. :meth:`resolve` gives the steps of a run of N steps."""

    indices: tuple[int, ...] | None = None
    window: tuple[float, float] = (0.0, 1.0)
    key: str = "steps"

    @classmethod
    def parse(cls, spec, numbers: str = "index", key: str = "steps") -> StepSpec:
        """``spec`` as written in a config (see the module docstring); ``key`` names it in errors."""
        if numbers not in NUMBERS:
            raise ValueError(f"numbers={numbers!r} is not one of {NUMBERS}")
        if isinstance(spec, StepSpec):
            return spec
        if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
            return cls(key=key)
        if isinstance(spec, str) and spec.strip().lower() == "none":
            return cls(indices=(), key=key)
        fraction = numbers == "fraction"
        if fraction and _is_number(spec):
            if not (math.isfinite(spec) and 0 <= spec <= 1):
                raise UserError(f"{key}={spec!r} is outside [0, 1]; allowed: a fraction of the steps, or [start, end]")
            return cls(window=(0.0, float(spec)), key=key)
        if fraction and isinstance(spec, (list, tuple)) and len(spec) == 2 and all(_is_number(v) for v in spec):
            if not all(math.isfinite(v) and 0 <= v <= 1 for v in spec) or spec[0] > spec[1]:
                raise UserError(f"{key}={list(spec)!r}: allowed [start, end] with 0 ≤ start ≤ end ≤ 1")
            return cls(window=(float(spec[0]), float(spec[1])), key=key)
        items = spec.split(",") if isinstance(spec, str) else [spec] if _is_int(spec) else spec
        if not isinstance(items, (list, tuple)):
            raise UserError(cls._bad(spec, key, fraction))
        steps: set[int] = set()
        for item in items:
            if _is_int(item):
                lo = hi = int(item)
            else:
                m = _ITEM.fullmatch(item.strip()) if isinstance(item, str) else None
                if m is None:
                    raise UserError(cls._bad(spec, key, fraction))
                lo, hi = (int(m[1]), int(m[2])) if m[3] is None else (int(m[3]), int(m[3]))
                if lo > hi:
                    raise UserError(f"{key}={spec!r}: the range {item.strip()!r} is empty; write it as low-high")
            if lo < 0:
                raise UserError(f"{key}={spec!r}: step {lo} is negative; steps count from 0")
            steps.update(range(lo, hi + 1))
        return cls(indices=tuple(sorted(steps)), key=key)

    @staticmethod
    def _bad(spec, key: str, fraction: bool) -> str:
        what = "is not a fraction" if fraction else "is not a step spec"
        first = "a number in [0, 1], [start, end] fractions" if fraction else "0-based steps like [1, 3]"
        return f"{key}={spec!r} {what}; allowed: {first}, step ranges like '0-9' or '0,2,4', 'all' or 'none'"

    def resolve(self, num_steps: int) -> set[int]:
        """The 0-based steps of a run of ``num_steps`` steps; an index past the run is a UserError."""
        if self.indices is None:
            start, end = self.window
            return set(range(int(start * num_steps), int(end * num_steps)))
        bad = [s for s in self.indices if s >= num_steps]
        if bad:
            raise UserError(f"{self.key}: step {bad[0]} is outside 0..{num_steps - 1} (a run of {num_steps} steps)")
        return set(self.indices)


def parse_steps(spec, num_steps: int, numbers: str = "index", key: str = "steps") -> set[int]:
    """:meth:`StepSpec.parse` then :meth:`StepSpec.resolve`: the set of 0-based steps ``spec`` names."""
    return StepSpec.parse(spec, numbers, key).resolve(num_steps)
