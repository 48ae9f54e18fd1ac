"""Where does the toy model read a prompt's colour and shape from? (issue 25, claims (c), (d))

For each group of key positions, its columns of every cross-attention map are zeroed (the Fig. 5
"subtract" of :class:`editing.replace.TokenMapEdit`: all cross layers, all steps, conditional branch),
the prompt is sampled from the same noise as without the edit, and the toy world's pixel checker reads
the image: how often are the prompt's colour and shape still there? A group the model reads the colour
(or shape) from loses it when zeroed. Groups: ``none`` (no edit), ``a``, ``colour``, ``noun``, ``end``
(the end token), ``padding`` (every position after the end token), ``end+padding``, ``words`` (every
word of the prompt) and ``all but start``.

The text encoder is causal, so the end token and the padding carry the whole prompt: a UNet can read the
prompt there rather than from its words, and then the words' maps — which Figs. 4 and 5 replace or
subtract — barely matter.

    python -m toyworld.diagnose_reading [--model models/toy] [--seeds 6]

prints one table: group, colour kept, shape kept (counts over prompts × seeds).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from editing.replace import TokenMapEdit
from editing.two_branch import model_layers, pair_rows, replacement_edits
from sdattn.sampling import decode, initial_latents
from toyworld.diagnose_tokens import Positions, sampling_settings
from toyworld.model import load_pipeline
from toyworld.scores import read_image
from toyworld.world import load_world

PROMPTS = ("a pink car", "a red star in the park", "a blue circle", "a green triangle")


def position_groups(tokenizer, prompt: str) -> dict[str, list[int]]:
    """Key positions of ``prompt`` "a <colour> <noun> ..." by group (module docstring)."""
    p = Positions(end=len(tokenizer(prompt).input_ids) - 1)  # start, the words, end
    length = tokenizer.model_max_length
    return {"none": [], "a": [p.article], "colour": [p.colour], "noun": [p.noun], "end": [p.end],
            "padding": list(range(p.end + 1, length)), "end+padding": list(range(p.end, length)),
            "words": list(range(p.start + 1, p.end)), "all but start": list(range(p.start + 1, length))}


def kept(pipe, world, prompt: str, positions: list[int], seeds: list[int], steps: int,
         guidance: float) -> tuple[int, int]:
    """(colour kept, shape kept): images of ``prompt`` over ``seeds`` sampled with ``positions`` zeroed."""
    cross = [x for x in model_layers(pipe) if x.kind == "cross"]
    rows, active = pair_rows(len(seeds)), set(range(steps))
    hooks = {x: (lambda lay, st: TokenMapEdit(lay, st, rows, active, positions, positions, "subtract"))
             for x in cross} if positions else {}
    latents = torch.cat([initial_latents(pipe, [s]) for s in seeds])  # (n, C, h, w)
    z = replacement_edits(pipe, [(prompt, prompt)] * len(seeds), latents, hooks, steps, guidance, progress=False)
    want = world.parse_prompt(prompt)
    read = [read_image(im, world) for im in decode(pipe, z[1::2])]  # the edited (second) branch of each pair
    return sum(r.color == want["color"] for r in read), sum(r.shape == want["shape"] for r in read)


def diagnose(pipe, world, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> pd.DataFrame:
    """One row per position group: colour and shape kept, summed over ``prompts`` × ``seeds``."""
    total: dict[str, list[int]] = {}
    for prompt in prompts:
        for group, positions in position_groups(pipe.tokenizer, prompt).items():
            c, s = kept(pipe, world, prompt, positions, seeds, steps, guidance)
            acc = total.setdefault(group, [0, 0])
            acc[0], acc[1] = acc[0] + c, acc[1] + s
    n = len(prompts) * len(seeds)
    return pd.DataFrame([{"zeroed": g, "colour kept": f"{c}/{n}", "shape kept": f"{s}/{n}"}
                         for g, (c, s) in total.items()])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/toy")
    ap.add_argument("--seeds", type=int, default=6, help="noise seeds 0..N-1 per prompt")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, world = load_pipeline(args.model), load_world()
    table = diagnose(pipe, world, list(PROMPTS), list(range(args.seeds)), *sampling_settings(args.model))
    print(f"model {args.model}: {len(PROMPTS)} prompts × {args.seeds} seeds; the columns of the zeroed positions "
          "removed from every cross-attention map")
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
