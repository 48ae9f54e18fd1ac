"""Attention-replacement hooks for editing, on the shared hook layer.

Map replacement uses the identity softmax(Q_src K_srcᵀ/√d)·V_tgt = SDPA(q_src, k_src, v_tgt):
the target row's query and key are swapped for the source row's before one batched SDPA call,
so no attention map is materialised and the cost equals plain sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdattn.errors import UserError
from sdattn.hooks import AttentionHook, StepState
from sdattn.layers import LayerId


class RowInjection(AttentionHook):
    """On active steps, some of q / k / v (``tensors``) of destination rows are taken from source rows,
    then one batched SDPA: the shared mechanism of FPE, P2P's map replacement, PnP and MasaCtrl.

    Subclasses give :meth:`active` (default: ``state.step in steps``) and :meth:`rows` → [(from, to)]
    batch rows for the current :class:`~sdattn.hooks.BatchLayout`.

    Cost (eager): on active steps, each destination row of each injected tensor is overwritten in place
    by its source row (one row copy per pair and tensor; q, k, v are this call's own projections, and
    SDPA then reads the same strided views as unhooked layers do); nothing on inactive steps. Rows that
    are both a source and a destination fall back to one ``index_select`` per tensor. Under
    ``torch.compile`` the step is read from ``state.step_index`` (a tensor) through a per-step table
    of row indices (``index_select``), so compiled code never branches on, or guards, the step number.
    """

    tensors: tuple[str, ...] = ("query", "key")

    def __init__(self, layer: LayerId, state: StepState, steps: set[int] | None = None):
        super().__init__(layer, state)
        self.steps = steps
        self._built: tuple | None = None  # (layout, num_steps) the index tensors below are for
        self._index: torch.Tensor | None = None  # (B,) int64: row r reads row _index[r]
        self._copies: list[tuple[int, int]] | None = None  # (from, to) row copies, or None: use _index
        self._table: torch.Tensor | None = None  # (num_steps, B) int64: _index on active steps, identity elsewhere

    def active(self) -> bool:
        return self.state.step in self.steps

    def rows(self, layout) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _active_steps(self, num_steps: int) -> list[bool]:
        """:meth:`active` at every step of the run (evaluated once per run, in Python)."""
        step = self.state.step
        try:
            flags = []
            for s in range(num_steps):
                self.state.step = s
                flags.append(bool(self.active()))
            return flags
        finally:
            self.state.step = step

    def _build(self, device) -> None:
        """The row index (and per-step table) for the current layout, once per run."""
        layout, num_steps = self.state.layout, self.state.num_steps
        if self._built is not None and self._built[0] is layout and self._built[1] == num_steps:
            return  # same run (the sampler makes one layout per run; held here, so its id is not reused)
        batch = 2 * layout.n if layout.cfg else layout.n
        index = list(range(batch))
        for src, dst in self.rows(layout):
            index[dst] = src
        pairs = [(src, dst) for dst, src in enumerate(index) if src != dst]
        chained = {src for src, _ in pairs} & {dst for _, dst in pairs}
        self._copies = None if chained else pairs  # in-place copies must not read a row already overwritten
        table = [index if on else list(range(batch)) for on in self._active_steps(num_steps or 0)]
        with torch.inference_mode(False):  # ordinary tensors, usable by any later caller
            self._index = torch.tensor(index, dtype=torch.long, device=device)
            self._table = torch.tensor(table, dtype=torch.long, device=device).reshape(len(table), batch)
        self._built = (layout, num_steps)

    def prepare(self) -> None:
        if self.state.step_index is not None and self.state.layout is not None:
            self._build(self.state.step_index.device)

    def attend(self, attn, query, key, value, mask):
        """As :meth:`AttentionHook.attend`; on active steps (eager) the injected rows of ``query`` /
        ``key`` / ``value`` are overwritten in place (in a processor they are this call's projections)."""
        qkv = {"query": query, "key": key, "value": value}
        if torch.compiler.is_compiling():
            index = self._table.index_select(0, self.state.step_index)[0]  # (B,): identity on inactive steps
        elif self.active():
            self._build(query.device)  # a no-op after prepare()
            index = self._index
            if self._copies is not None:
                for name in self.tensors:  # (B, H, N, d) views of this call's projections: rows in place
                    for src, dst in self._copies:
                        qkv[name][dst] = qkv[name][src]
                return super().attend(attn, query, key, value, mask)
        else:
            return super().attend(attn, query, key, value, mask)
        for name in self.tensors:
            qkv[name] = qkv[name].index_select(0, index)
        return super().attend(attn, qkv["query"], qkv["key"], qkv["value"], mask)


class AttentionReplace(RowInjection):
    """In the conditional branch, target rows attend with the source row's map (active steps only).

    ``pairs``: (source prompt index, target prompt index) in the batch.
    """

    def __init__(self, layer: LayerId, state: StepState, pairs: Sequence[tuple[int, int]], steps: set[int]):
        super().__init__(layer, state, steps)
        self.pairs = list(pairs)

    def rows(self, layout) -> list[tuple[int, int]]:
        return [(layout.cond_row(s), layout.cond_row(t)) for s, t in self.pairs]


class TokenMapEdit(AttentionHook):
    """Cross-attention, per token, in the conditional branch: the target's map columns at
    ``target_positions`` are replaced by the source's columns at ``source_positions``
    (``mode="replace"``) or zeroed (``mode="subtract"``, the token's contribution removed)."""

    def __init__(self, layer: LayerId, state: StepState, pairs: Sequence[tuple[int, int]], steps: set[int],
                 source_positions: Sequence[int], target_positions: Sequence[int], mode: str = "replace"):
        super().__init__(layer, state)
        if mode not in ("replace", "subtract"):
            raise UserError(f"token edit mode {mode!r} is not one of ['replace', 'subtract']")
        if len(source_positions) != len(target_positions):
            raise UserError("the edited word has a different number of tokens in source and target prompts")
        self.pairs, self.steps, self.mode = list(pairs), steps, mode
        self.src_pos, self.tgt_pos = list(source_positions), list(target_positions)

    def attend(self, attn, query, key, value, mask):
        if self.state.step not in self.steps:
            return super().attend(attn, query, key, value, mask)
        probs = torch.softmax(query @ key.transpose(-1, -2) * attn.scale, -1)  # (B, H, N, L): small for cross
        lay = self.state.layout
        for s, t in self.pairs:
            rs, rt = lay.cond_row(s), lay.cond_row(t)
            new = probs[rs, :, :, self.src_pos] if self.mode == "replace" else 0.0
            probs[rt, :, :, self.tgt_pos] = new
        return probs @ value

