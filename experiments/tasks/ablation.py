"""Attention-replacement ablations (Liu et al. §3.4–3.6, Fig. 4–5): one grid row per layer range
(cross or self maps of the target ← source) or per token edit (replace / subtract a token's
cross-attention map); one column per seed, plus the source and the plain target."""

from __future__ import annotations

from omegaconf import DictConfig

from editing.grid import labelled_grid
from editing.replace import AttentionReplace, TokenMapEdit
from editing.two_branch import SOURCE, TARGET, model_layers, replacement_edit
from experiments.common import load_model, output_dir, plain
from probing.prompts import word_token_positions
from sdattn.errors import UserError
from sdattn.layers import select_layers
from sdattn.sampling import decode, initial_latents
from sdattn.steps import parse_steps


def ablation_rows(pipe, a: DictConfig, source_prompt: str | None = None, target_prompt: str | None = None,
                  pairs: list[tuple[int, int]] | None = None) -> list[tuple[str, dict]]:
    """(row label, {layer: hook factory}) for every row of the figure described by ``a`` (an
    ``configs/ablation/*.yaml`` node); token rows find their words in ``source_prompt`` / ``target_prompt``
    (default: the node's own prompts). ``pairs``: the (source, target) batch positions the hooks edit
    (default: one pair, as :func:`~editing.two_branch.replacement_edit` samples)."""
    source_prompt = source_prompt or a.source_prompt
    target_prompt = target_prompt or a.target_prompt
    layers = model_layers(pipe)
    steps = parse_steps(plain(a.steps), a.num_inference_steps, "fraction", "ablation.steps")
    pair = pairs or [(SOURCE, TARGET)]
    rows = []
    if a.kind in ("cross", "self"):
        for spec in a.ranges:
            spec = plain(spec)
            chosen = select_layers(layers, spec, a.kind)
            label = f"{a.kind} {spec if isinstance(spec, str) else ','.join(map(str, spec))}"
            rows.append((label, {x: (lambda lay, st: AttentionReplace(lay, st, pair, steps)) for x in chosen}))
    elif a.kind == "tokens":
        chosen = select_layers(layers, a.layers, "cross")
        for edit in a.tokens:
            src = word_token_positions(pipe.tokenizer, source_prompt, edit.word)
            tgt = word_token_positions(pipe.tokenizer, target_prompt, edit.word)
            sign = "-" if edit.mode == "subtract" else "<-"
            rows.append((f"{sign} {edit.word}", {x: (lambda lay, st, s=src, t=tgt, m=edit.mode:
                                                     TokenMapEdit(lay, st, pair, steps, s, t, m)) for x in chosen}))
    else:
        raise UserError(f"ablation.kind {a.kind!r} is not one of ['cross', 'self', 'tokens']")
    return rows


def run(cfg: DictConfig) -> dict:
    """Writes ``<name>.png`` (labelled grid) and returns the per-row final latents."""
    a = cfg.ablation
    pipe = load_model(cfg)
    rows = ablation_rows(pipe, a)
    grid_rows, labels, latents = [], [], {}
    seeds = list(a.seeds)
    plain = [replacement_edit(pipe, a.source_prompt, a.target_prompt, initial_latents(pipe, [s]), {},
                              a.num_inference_steps, a.guidance_scale, progress=cfg.progress) for s in seeds]
    plain_images = [decode(pipe, x) for x in plain]
    grid_rows.append([(img[0], f"seed {s}: {a.source_prompt}") for s, img in zip(seeds, plain_images)])
    labels.append("source")
    grid_rows.append([(img[1], f"seed {s}: {a.target_prompt}") for s, img in zip(seeds, plain_images)])
    labels.append("target (no edit)")
    for label, hooks in rows:
        outs = [replacement_edit(pipe, a.source_prompt, a.target_prompt, initial_latents(pipe, [s]), hooks,
                                 a.num_inference_steps, a.guidance_scale, progress=cfg.progress) for s in seeds]
        latents[label] = [o[1:] for o in outs]
        grid_rows.append([(decode(pipe, o[1:])[0], f"seed {s}") for s, o in zip(seeds, outs)])
        labels.append(label)
    out = output_dir(cfg) / f"{a.name}.png"
    labelled_grid(grid_rows, cell=a.cell, row_labels=labels).save(out)
    print(f"{a.name}: {len(rows)} rows × {len(seeds)} seeds → {out}")
    return {"file": out, "rows": [r[0] for r in rows], "latents": latents}
