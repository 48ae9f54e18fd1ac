"""Lock-step timing on a shared CPU: two calls run in two threads that take turns at every UNet call,
so both see the same machine at a ~50 ms grain, and each is timed by its own thread's CPU time.

Why: on a 2-core VM shared with other tenants, the speed of the machine drifts by ±30 % between
seconds, so two calls timed one after the other (even in rotated rounds) differ by more than the
few per cent a hook costs. Taking turns at each UNet call puts both calls under the same drift;
the per-pair ratio is then tight enough to read a 2 % difference from a handful of pairs.

How: the baseline call runs on one pipeline, the variant on a *twin* (:func:`sdattn.models.twin_pipeline`: the
same weight tensors, its own UNet modules, so attention processors installed by one call never reach
the other). A forward pre-hook on each UNet hands the turn to the other thread before every UNet
call (a ``torch.nn.Module`` hook, used only here: nothing of the sampler or the editors changes).
Only the thread holding the turn runs; one torch thread (``torch.set_num_threads(1)``) keeps every
kernel on the calling thread, so ``time.thread_time`` is the call's whole CPU cost. CPU only: on
CUDA the work is asynchronous and wall time with synchronisation is the measure.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable


class Baton:
    """Two threads (0 and 1) take turns; :meth:`switch` hands the turn over and waits for it back."""

    def __init__(self):
        self._cond = threading.Condition()
        self._turn = 0
        self._done = [False, False]

    def _wait(self, me: int) -> None:
        self._cond.wait_for(lambda: self._turn == me or self._done[1 - me])

    def take(self, me: int) -> None:
        with self._cond:
            self._wait(me)

    def switch(self, me: int) -> None:
        with self._cond:
            if not self._done[1 - me]:
                self._turn = 1 - me
                self._cond.notify_all()
                self._wait(me)

    def finish(self, me: int) -> None:
        with self._cond:
            self._done[me] = True
            self._turn = 1 - me
            self._cond.notify_all()


def lockstep_pair(first: Callable[[], object], second: Callable[[], object], unets: tuple) -> tuple[float, float]:
    """Run ``first`` and ``second`` taking turns at every call of their UNets (``unets``: the module each
    call uses, in the same order); → (CPU seconds of first, CPU seconds of second)."""
    baton, seconds, errors = Baton(), [0.0, 0.0], []
    handles = [u.register_forward_pre_hook(lambda *_, me=me: baton.switch(me)) for me, u in enumerate(unets)]

    def worker(me: int, call: Callable[[], object]) -> None:
        try:
            baton.take(me)
            t0 = time.thread_time()
            call()
            seconds[me] = time.thread_time() - t0
        except BaseException as e:  # re-raised in the caller
            errors.append(e)
        finally:
            baton.finish(me)

    threads = [threading.Thread(target=worker, args=(me, call)) for me, call in enumerate((first, second))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for h in handles:
            h.remove()
    if errors:
        raise errors[0]
    return seconds[0], seconds[1]


def lockstep_ratios(base: dict[str, Callable], twin: dict[str, Callable], baselines: dict[str, str], unets: tuple,
                    rounds: int) -> dict[str, dict]:
    """For every variant with another baseline: ``rounds`` lock-step pairs (baseline on ``base``'s
    pipeline, the variant on the twin's; which thread starts alternates by round).
    → {variant: {"ratios": [...], "ratio": median, "ratio_min", "ratio_max"}}."""
    out = {}
    for name, baseline in baselines.items():
        if name == baseline:
            continue
        ratios = []
        for r in range(rounds):
            if r % 2 == 0:
                b, v = lockstep_pair(base[baseline], twin[name], unets)
            else:
                v, b = lockstep_pair(twin[name], base[baseline], unets[::-1])
            ratios.append(v / b)
        out[name] = {"ratios": ratios, "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)}
    return out
