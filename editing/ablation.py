"""Attention-replacement ablations (Liu et al. §3.4–3.6, Fig. 4–5): one row per layer range (cross or self
maps of the target ← source) or per token edit (replace / subtract a token's cross-attention map), each
row a {layer: hook factory} for :func:`~editing.two_branch.replacement_edits`; the figure's grid (one column
per seed, plus the source and the plain target); the rows of several figures sampled in batches of pairs
(:class:`EditRows`, for ``experiment=claims``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sdattn.errors import UserError
from sdattn.layers import select_layers
from sdattn.sampling import decode, initial_latents
from sdattn.steps import parse_steps
from sdattn.text import word_token_positions

from .replace import AttentionReplace, TokenMapEdit
from .two_branch import SOURCE, TARGET, model_layers, pair_rows, replacement_edit

PLAIN = "target (no edit)"  # the row without hooks: the target prompt sampled from the source's noise
KINDS = ("cross", "self", "tokens")


@dataclass(frozen=True)
class Ablation:
    """One figure's replacements (``configs/ablation/<name>.yaml`` as values). ``kind`` cross / self: one row
    per layer spec of ``ranges``; tokens: one row per ``{word, mode}`` of ``tokens`` on the ``layers``' cross
    maps. ``steps``: the replaced steps (a fraction, ``[start, end]`` or a 0-based step spec)."""

    name: str
    kind: str
    source_prompt: str
    target_prompt: str
    steps: object
    num_inference_steps: int
    guidance_scale: float
    seeds: Sequence[int]
    cell: int  # grid cell size, px
    ranges: Sequence = ()  # cross / self
    layers: object = None  # tokens
    tokens: Sequence[dict] = ()  # tokens

    @classmethod
    def from_settings(cls, settings: dict) -> Ablation:
        """From a plain ``configs/ablation/*.yaml`` node (keys this class does not have are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names})

    def with_ranges(self, ranges: Sequence) -> Ablation:
        return dataclasses.replace(self, ranges=list(ranges))


def ablation_rows(pipe, a: Ablation, pairs: list[tuple[int, int]] | None = None) -> list[tuple[str, dict]]:
    """(row label, {layer: hook factory}) for every row of ``a``. ``pairs``: the (source, target) batch
    positions the hooks edit (default: one pair, as :func:`~editing.two_branch.replacement_edit` samples)."""
    layers = model_layers(pipe)
    steps = parse_steps(a.steps, a.num_inference_steps, "fraction", "ablation.steps")
    pair = pairs or [(SOURCE, TARGET)]
    rows = []
    if a.kind in ("cross", "self"):
        for spec in a.ranges:
            chosen = select_layers(layers, spec, a.kind)
            label = f"{a.kind} {spec if isinstance(spec, str) else ','.join(map(str, spec))}"
            rows.append((label, {x: (lambda lay, st: AttentionReplace(lay, st, pair, steps)) for x in chosen}))
    elif a.kind == "tokens":
        chosen = select_layers(layers, a.layers, "cross")
        for edit in a.tokens:
            src = word_token_positions(pipe.tokenizer, a.source_prompt, edit["word"])
            tgt = word_token_positions(pipe.tokenizer, a.target_prompt, edit["word"])
            sign = "-" if edit["mode"] == "subtract" else "<-"
            rows.append((f"{sign} {edit['word']}", {x: (lambda lay, st, s=src, t=tgt, m=edit["mode"]:
                                                        TokenMapEdit(lay, st, pair, steps, s, t, m)) for x in chosen}))
    else:
        raise UserError(f"ablation.kind {a.kind!r} is not one of {list(KINDS)}")
    return rows


def ablation_grid(pipe, a: Ablation, progress: bool = False) -> tuple[list, list[str], dict[str, list]]:
    """The figure: per seed of ``a.seeds`` the source and the plain target, then every row's edit.
    → (grid rows of (image, caption), row labels, {row label: [edited final latents (1, C, h, w) per seed]})."""
    def edit(hooks: dict, seed: int) -> torch.Tensor:  # (2, C, h, w): source, target
        return replacement_edit(pipe, a.source_prompt, a.target_prompt, initial_latents(pipe, [seed]), hooks,
                                a.num_inference_steps, a.guidance_scale, progress=progress)

    rows = ablation_rows(pipe, a)  # a bad range or word refused before any sampling
    seeds = list(a.seeds)
    plain_images = [decode(pipe, edit({}, s)) for s in seeds]
    grid = [[(img[0], f"seed {s}: {a.source_prompt}") for s, img in zip(seeds, plain_images)],
            [(img[1], f"seed {s}: {a.target_prompt}") for s, img in zip(seeds, plain_images)]]
    labels, latents = ["source", PLAIN], {}
    for label, hooks in rows:
        outs = [edit(hooks, s) for s in seeds]
        latents[label] = [o[1:] for o in outs]
        grid.append([(decode(pipe, o[1:])[0], f"seed {s}") for s, o in zip(seeds, outs)])
        labels.append(label)
    return grid, labels, latents


@dataclass
class EditRows:
    """The rows of several figures' edits: the unedited target (:data:`PLAIN`), then every row of the
    ``ablations`` ((group, :class:`Ablation`) pairs); hooks are built per batch size (n pairs sampled
    together by :func:`~editing.two_branch.replacement_edits`). Every ablation uses the same sampling."""

    pipe: object
    ablations: list[tuple[str, Ablation]]
    groups: dict[str, str] = field(init=False)  # row label → its group ("plain" for the unedited target)
    _hooks: dict[int, dict[str, dict]] = field(init=False, default_factory=dict)

    def __post_init__(self):
        first = self.ablations[0][1]
        if any((a.num_inference_steps, a.guidance_scale) != (first.num_inference_steps, first.guidance_scale)
               for _, a in self.ablations):
            raise UserError("claims.ablations: every ablation of one claim must use the same steps and guidance")
        self.groups = {PLAIN: "plain"}
        for group, a in self.ablations:
            self.groups.update({label: group for label, _ in ablation_rows(self.pipe, a)})

    @property
    def sampling(self) -> tuple[int, float]:
        """(num_inference_steps, guidance_scale) of every row."""
        first = self.ablations[0][1]
        return int(first.num_inference_steps), float(first.guidance_scale)

    @property
    def labels(self) -> list[str]:
        return list(self.groups)

    def hooks(self, n: int) -> dict[str, dict]:
        """{row label: {layer: hook factory}} for a batch of ``n`` pairs."""
        if n not in self._hooks:
            rows = {PLAIN: {}}
            for _, a in self.ablations:
                rows.update(ablation_rows(self.pipe, a, pairs=pair_rows(n)))
            self._hooks[n] = rows
        return self._hooks[n]


def sweep_rows(pipe, cross: Ablation, self_: Ablation, middle) -> tuple[EditRows, str, str, list[int]]:
    """Every cross and every self range of the model's Fig. 4, plus "all" (cross) and the ``middle`` self
    layers (a layer spec or preset) when not among them. Returns the rows, the labels of "cross all" and of
    the middle self range, and the middle's layer indices."""
    ablations, picks = [], {}
    for kind, a, extra in (("cross", cross, "all"), ("self", self_, middle)):
        rows = ablation_rows(pipe, a)
        label, hooks = ablation_rows(pipe, a.with_ranges([extra]))[0]
        same = [x for x, h in rows if set(h) == set(hooks)]
        if not same:
            a = a.with_ranges([*a.ranges, extra])
        picks[kind] = (same[0] if same else label, sorted(x.index for x in hooks))
        ablations.append((kind, a))
    return EditRows(pipe, ablations), picks["cross"][0], picks["self"][0], picks["self"][1]
