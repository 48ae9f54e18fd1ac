"""The attention recorder: what attention layers compute during a run, recorded and reduced as asked, in
the spirit of TransformerLens's ``run_with_cache``, on the hook contract (:mod:`sdattn.hooks`).

A :class:`Tap` says what to record (attention probabilities, q, k, v or the attention output), where (a
list of :class:`~sdattn.layers.LayerId`), when (0-based steps, :mod:`sdattn.steps`), and how reduced
(batch rows, heads, a weighted sum over the keys such as a word's tokens, a query grid resized, pooling,
and over the steps: each, last, mean or sum), on CPU or kept on the device, with or without autograd::

    rec = Recorder([Tap(cross_layers, "probs", rows="cond", heads="mean", tokens=weights, over_steps="mean")])
    with rec.installed(pipe.unet):              # HookSet: installed, restored in ``finally``
        sample(pipe, prompts, seeds, callbacks=[rec])   # the sampler tells the hooks step and batch layout
    rec["probs"]                                # {layer label: (B, T, N)}, averaged over the steps, on CPU

Beside editing hooks on the same layers, ``rec.hooks(editing_hooks)`` gives the {layer: factory} of the
caller's HookSet (e.g. :func:`editing.two_branch.replacement_edit`); q, k, v are recorded as projected
(before the editing hook sees them) and ``out`` as the editing hook returns it. Observers that consume
maps inside the loop read ``rec[name]`` after each step (sums so far, or the latest call's maps).
Layers with no due tap this call compute plain SDPA; unhooked layers keep diffusers' processor.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import UserError
from .hooks import AttentionHook, BatchLayout, HookSet, StepState
from .layers import LayerId
from .maps import (
    attend_to,
    attention_with_pooled_map,
    mean_map,
    pool_map,
    pooled_self_attention,
    probabilities,
    query_grid,
)

WHAT = ("probs", "q", "k", "v", "out")
ROWS = ("all", "cond", "uncond")
OVER_STEPS = ("each", "last", "mean", "sum")
Factory = Callable[[LayerId, StepState], AttentionHook]


@dataclass(frozen=True, eq=False)
class Tap:
    """One thing to record on some layers. Shapes (R rows, H heads, N queries, M keys, d head width):

    - ``what``: ``"probs"`` softmax(QKᵀ·scale) (R, H, N, M); ``"q"``, ``"k"``, ``"v"`` as projected and
      ``"out"`` the attention output, each (R, H, ·, d).
    - ``steps``: the 0-based steps to record (:func:`sdattn.steps.parse_steps`), None = every call.
    - ``rows``: ``"all"``, ``"cond"`` / ``"uncond"`` (the :class:`~sdattn.hooks.BatchLayout`'s branch;
      without guidance every row is conditional), or a function of the layout giving a row index.
    - ``heads``: ``"all"``, ``"mean"`` (the head axis dropped) or one head's index (dropped too).
    - probs only: ``tokens`` (R or 1, T, M) weights over the keys → T weighted sums of key columns, the
      query axis last (R, [H,] T, N) (a word's map: 1/len on its token positions); ``size``: with
      ``tokens``, the queries as the layer's grid bilinearly resized to ``size`` (R, [H,] T, *size);
      ``pool``: self layers, queries and keys average-pooled to pool × pool bins (R, [H,] pool², pool²);
      ``float32``: computed in float32 (else the model's dtype); ``transform(layer, state, probs)``:
      applied to the per-head (R, H, N, M) map before the reductions (e.g. an editor's map edit).
    - ``over_steps``: ``"each"`` (stacked on a new first axis), ``"last"``, ``"mean"`` or ``"sum"``
      (float32 running sums on the device: no host sync per call).
    - ``grad``: keep the autograd graph (an observer's loss backpropagates through the maps); ``cpu``:
      results move to the CPU when read (recording itself never syncs).
    - ``name``: the key to read (default ``what``).
    """

    layers: Sequence[LayerId]
    what: str = "probs"
    name: str | None = None
    steps: Collection[int] | None = None
    rows: str | Callable[[BatchLayout | None], object] = "all"
    heads: str | int = "all"
    tokens: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    pool: int | None = None
    float32: bool = False
    transform: Callable[[LayerId, StepState, torch.Tensor], torch.Tensor] | None = None
    over_steps: str = "each"
    grad: bool = False
    cpu: bool = True

    def __post_init__(self):
        def bad(setting: str, allowed: str):
            raise UserError(f"recorder tap {self.key!r}: {setting}={getattr(self, setting)!r}; allowed: {allowed}")

        if self.what not in WHAT:
            bad("what", ", ".join(WHAT))
        if not (self.rows in ROWS or callable(self.rows)):
            bad("rows", f"{', '.join(ROWS)} or a function of the batch layout")
        if not (self.heads in ("all", "mean") or (isinstance(self.heads, int) and not isinstance(self.heads, bool)
                                                  and self.heads >= 0)):
            bad("heads", "all, mean or a head index ≥ 0")
        if self.over_steps not in OVER_STEPS:
            bad("over_steps", ", ".join(OVER_STEPS))
        if self.what != "probs" and (self.tokens is not None or self.size is not None or self.pool is not None
                                     or self.float32 or self.transform is not None):
            raise UserError(f"recorder tap {self.key!r}: tokens, size, pool, float32 and transform apply to "
                            f"attention probabilities (what='probs'), not {self.what!r}")
        if self.size is not None and self.tokens is None:
            bad("size", "a grid size together with tokens (per-word maps)")
        if self.pool is not None:
            if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1 or \
                    self.tokens is not None:
                bad("pool", "an integer ≥ 1, without tokens")
            cross = [x.label for x in self.layers if x.kind != "self"]
            if cross:
                raise UserError(f"recorder tap {self.key!r}: pooling keys needs self-attention layers, not {cross[0]}")

    @property
    def key(self) -> str:
        return self.name or self.what

    def due(self, state: StepState) -> bool:
        return self.steps is None or state.step in self.steps

    def row_index(self, layout: BatchLayout | None):
        """The rows to keep (a slice or a list), or None for every row."""
        if callable(self.rows):
            return self.rows(layout)
        if self.rows == "all":
            return None
        if self.rows == "cond":
            return None if layout is None else layout.cond_rows
        if layout is None or not layout.cfg:
            raise UserError(f"recorder tap {self.key!r}: rows='uncond' but this run has no unconditional branch")
        return slice(0, layout.n)

    def fuses(self, query: torch.Tensor, mask) -> bool:
        """Whether the head-mean pooled map of the conditional rows and the layer's output can come from
        the same probabilities (CPU: one QKᵀ; CUDA keeps fused SDPA kernels instead)."""
        return (self.pool is not None and self.heads == "mean" and self.rows == "cond" and self.transform is None
                and not self.float32 and mask is None and not query.is_cuda)

    def record(self, attn, layer: LayerId, state: StepState, query, key, value) -> torch.Tensor:
        """This tap's value of one call, reduced (before the over-steps reduction)."""
        index = self.row_index(state.layout)
        if self.what == "probs":
            x = self._probs(attn, layer, state, query, key, index)
        else:
            x = {"q": query, "k": key, "v": value}[self.what]
            x = x if index is None else x[index]
            x = x.mean(1) if self.heads == "mean" else x if self.heads == "all" else x[:, self.heads]
        return self.finish(x)

    def output(self, out: torch.Tensor, state: StepState) -> torch.Tensor:
        """The ``"out"`` tap's value: the attention output (B, H, N, d) reduced."""
        index = self.row_index(state.layout)
        x = out if index is None else out[index]
        x = x.mean(1) if self.heads == "mean" else x if self.heads == "all" else x[:, self.heads]
        return self.finish(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.grad else x.detach()
        if self.over_steps in ("mean", "sum"):
            return x.float()
        # q, k, v, out are (views of) this call's tensors, which an editing hook may overwrite in place
        return x.clone() if self.what != "probs" else x

    def _probs(self, attn, layer: LayerId, state: StepState, query, key, index) -> torch.Tensor:
        q, k = (query, key) if index is None else (query[index], key[index])
        if not isinstance(self.heads, str):
            q, k = q[:, self.heads:self.heads + 1], k[:, self.heads:self.heads + 1]  # one head: its "mean"
        if self.float32:
            q, k = q.float(), k.float()
        hw, scale = (layer.height, layer.width), attn.scale
        if self.heads != "all" and self.transform is None:  # head-mean maps without a per-head map
            if self.tokens is not None:
                maps = attend_to(q, k, self.tokens.to(q.device).transpose(1, 2), scale).transpose(1, 2)  # (R, T, N)
                return maps if self.size is None else query_grid(maps, hw, self.size)
            if self.pool is not None:
                return pooled_self_attention(q, k, scale, hw, self.pool).reshape(q.shape[0], self.pool ** 2, -1)
            return mean_map(q, k, scale)
        probs = probabilities(q, k, scale)  # (R, H, N, M)
        if self.transform is not None:
            probs = self.transform(layer, state, probs)
        if self.heads != "all":
            probs = probs.float().mean(1)  # (R, N, M)
        if self.tokens is not None:
            weights = self.tokens.to(probs)
            maps = (probs @ (weights if probs.ndim == 3 else weights[:, None]).transpose(-1, -2)).transpose(-1, -2)
            return maps if self.size is None else query_grid(maps, hw, self.size)
        return probs if self.pool is None else pool_map(probs, hw, self.pool)


class _Series:
    """One tap's values on one layer, reduced over the calls as the tap says."""

    __slots__ = ("over", "cpu", "value", "count", "items")

    def __init__(self, over: str, cpu: bool):
        self.over, self.cpu = over, cpu
        self.value, self.count, self.items = None, 0, []

    def add(self, x: torch.Tensor) -> None:
        if self.over == "each":
            self.items.append(x)
        elif self.over == "last" or self.value is None:
            self.value = x.clone() if self.over in ("mean", "sum") and not x.requires_grad else x
        elif x.requires_grad or self.value.requires_grad:
            self.value = self.value + x
        else:
            self.value += x  # in place, on the device
        self.count += 1

    def result(self) -> torch.Tensor:
        x = torch.stack(self.items) if self.over == "each" else self.value / self.count if self.over == "mean" \
            else self.value
        return x.cpu() if self.cpu else x


class RecordingHook(AttentionHook):
    """The recorder's processor on one layer: records the due taps around an optional ``inner`` hook,
    whose output it returns (else plain SDPA)."""

    def __init__(self, layer: LayerId, state: StepState, recorder: Recorder, taps: Sequence[Tap],
                 inner: AttentionHook | None = None):
        super().__init__(layer, state)
        self.recorder, self.taps, self.inner = recorder, list(taps), inner

    def prepare(self) -> None:
        if self.inner is not None:
            self.inner.prepare()

    def attend(self, attn, query, key, value, mask):
        run = super().attend if self.inner is None else self.inner.attend
        due = [t for t in self.taps if t.due(self.state)] if self.recorder.active else []
        if not due:
            return run(attn, query, key, value, mask)
        if mask is not None and any(t.what == "probs" for t in due):
            raise UserError(f"recording attention probabilities of {self.layer.label}: masked attention calls "
                            "are not supported")
        if self.inner is None and len(due) == 1 and due[0].fuses(query, mask):
            return self._pooled_and_output(attn, query, key, value, due[0])
        for tap in due:  # from this call's projections, before an inner hook sees (or overwrites) them
            if tap.what != "out":
                self.recorder.add(tap.key, self.layer, tap.record(attn, self.layer, self.state, query, key, value))
        out = run(attn, query, key, value, mask)
        for tap in due:
            if tap.what == "out":
                self.recorder.add(tap.key, self.layer, tap.output(out, self.state))
        return out

    def _pooled_and_output(self, attn, query, key, value, tap: Tap):
        """The conditional rows' output from the probabilities their pooled map is made of (equal to SDPA up to
        float rounding); plain SDPA for the unconditional rows."""
        layout = self.state.layout
        rows = slice(None) if layout is None else layout.cond_rows
        out, feat = attention_with_pooled_map(query[rows], key[rows], value[rows], attn.scale,
                                              (self.layer.height, self.layer.width), tap.pool)
        if layout is not None and layout.cfg:  # rows [uncond × n, cond × n]
            uncond = slice(0, rows.start)
            out = torch.cat([super().attend(attn, query[uncond], key[uncond], value[uncond], None), out])
        self.recorder.add(tap.key, self.layer, tap.finish(feat.reshape(feat.shape[0], tap.pool ** 2, -1)))
        return out


class Recorder:
    """Records its taps while installed (:meth:`installed`) or inside another HookSet (:meth:`hooks`);
    ``rec[name]`` → {layer label: result}. ``active = False`` pauses recording (the layers then compute
    plain SDPA, or their inner hook)."""

    def __init__(self, taps: Sequence[Tap]):
        self.taps = list(taps)
        seen: set[tuple[str, str]] = set()
        for tap in self.taps:
            for layer in tap.layers:
                if (tap.key, layer.label) in seen:
                    raise UserError(f"recorder: two taps record {tap.key!r} on {layer.label}; give them distinct names")
                seen.add((tap.key, layer.label))
        self.active = True
        self._series: dict[str, dict[str, _Series]] = {tap.key: {} for tap in self.taps}
        self._hookset: HookSet | None = None

    def hooks(self, around: Mapping[LayerId, Factory] | None = None) -> dict[LayerId, Factory]:
        """{layer: factory} of the recording hooks, each around ``around``'s hook of its layer (if any);
        ``around``'s other layers keep their hook alone."""
        around = dict(around or {})
        taps: dict[LayerId, list[Tap]] = {}
        for tap in self.taps:
            for layer in tap.layers:
                taps.setdefault(layer, []).append(tap)

        def factory(layer: LayerId, state: StepState) -> AttentionHook:
            inner = around[layer](layer, state) if layer in around else None
            return RecordingHook(layer, state, self, taps[layer], inner) if layer in taps else inner

        return {layer: factory for layer in [*around, *(x for x in taps if x not in around)]}

    @contextmanager
    def installed(self, unet, around: Mapping[LayerId, Factory] | None = None) -> Iterator[Recorder]:
        """Install the recording hooks (and ``around``'s) on ``unet``; pass the recorder to the sampler as
        a callback. The original processors are restored in ``finally``."""
        hooks = self.hooks(around)
        with HookSet(unet, list(hooks), lambda layer, state: hooks[layer](layer, state)) as hookset:
            self._hookset = hookset
            try:
                yield self
            finally:
                self._hookset = None

    # Sampler callback protocol (while installed) ------------------------------------------------------
    def on_step_begin(self, step: int, timestep: int, num_steps: int, layout: BatchLayout) -> None:
        if self._hookset is None:
            raise RuntimeError("the recorder is a sampler callback only inside `with recorder.installed(unet)`")
        self._hookset.on_step_begin(step, timestep, num_steps, layout)

    def on_step_end(self, step: int, timestep: int, latents: torch.Tensor) -> torch.Tensor | None:
        return None

    # The store --------------------------------------------------------------------------------------
    def add(self, name: str, layer: LayerId, value: torch.Tensor) -> None:
        """Add one call's reduced ``value`` of tap ``name`` on ``layer`` (what the recording hooks do)."""
        series = self._series[name]
        if layer.label not in series:
            tap = next(t for t in self.taps if t.key == name and layer in t.layers)
            series[layer.label] = _Series(tap.over_steps, tap.cpu)
        series[layer.label].add(value)

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        """{layer label: result} of tap ``name``, in the order the layers first ran."""
        if name not in self._series:
            raise KeyError(f"no tap named {name!r}; taps: {list(self._series)}")
        return {label: s.result() for label, s in self._series[name].items()}

    def clear(self) -> None:
        """Forget everything recorded so far."""
        for series in self._series.values():
            series.clear()
