"""Prompt-to-Prompt's token alignment (google/prompt-to-prompt ``seq_aligner.py``), re-implemented:
the word-level replacement mapper (``get_replacement_mapper``) and the Needleman–Wunsch refinement
mapper (``get_refinement_mapper`` / ``global_align``). Both follow the official behaviour exactly,
including its quirks (named where they occur), so that P2P here edits what P2P there edits.

Positions are prompt positions of the padded CLIP sequence (BOS = 0); ``max_len`` is the text
encoder's length (the tokenizer's ``model_max_length``)."""

from __future__ import annotations

import torch

from sdattn.errors import UserError

# global_align's scores (official ScoreParams(gap=0, match=1, mismatch=-1))
GAP, MATCH, MISMATCH = 0, 1, -1
# traceback codes: target token with no source, source token dropped, aligned pair, origin
LEFT, UP, DIAG, ORIGIN = 1, 2, 3, 4


def word_positions(text: str, word: int | str, tokenizer) -> list[int]:
    """Prompt positions of the tokens of ``word`` (an index into ``text.split(" ")``, or every word equal
    to a string): tokens are assigned to words by accumulating their decoded lengths (official
    ``get_word_inds``)."""
    words = text.split(" ")
    wanted = [i for i, w in enumerate(words) if w == word] if isinstance(word, str) else [word]
    if not wanted:
        return []
    pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]  # no BOS / EOS
    out, length, w = [], 0, 0
    for i, piece in enumerate(pieces):
        length += len(piece)
        if w in wanted:
            out.append(i + 1)
        if length >= len(words[w]):
            w, length = w + 1, 0
    return out


def replacement_mapper(source: str, target: str, tokenizer, max_len: int) -> torch.Tensor:
    """(max_len, max_len) M with rows = source positions, columns = target positions: the target's new
    cross-attention map is A_src @ M (official ``get_replacement_mapper_``). The prompts must have the
    same number of words; each changed word maps its source tokens to its target tokens (pairwise when
    the token counts agree, else every pair with weight 1/len(target tokens))."""
    src_words, tgt_words = source.split(" "), target.split(" ")
    if len(src_words) != len(tgt_words):
        raise UserError(f"P2P replace needs prompts with the same number of words: {source!r} has "
                        f"{len(src_words)}, {target!r} has {len(tgt_words)} (use refine)")
    changed = [k for k, (a, b) in enumerate(zip(src_words, tgt_words)) if a != b]
    src_pos = [word_positions(source, k, tokenizer) for k in changed]
    tgt_pos = [word_positions(target, k, tokenizer) for k in changed]
    m = torch.zeros(max_len, max_len)
    i = j = edit = 0
    while i < max_len and j < max_len:
        if edit < len(changed) and src_pos[edit][0] == i:
            s, t = src_pos[edit], tgt_pos[edit]
            if len(s) == len(t):
                m[s, t] = 1.0
            else:
                m[torch.tensor(s)[:, None], torch.tensor(t)[None, :]] = 1.0 / len(t)
            i, j, edit = i + len(s), j + len(t), edit + 1
        elif edit < len(changed):
            m[i, j] = 1.0
            i, j = i + 1, j + 1
        else:
            # Official quirk: after the last changed word the code sets M[j, j] (not M[i, j]), so when the
            # token counts differ by Δ the rest of the prompt is mapped by *target* position, shifted by Δ.
            m[j, j] = 1.0
            i, j = i + 1, j + 1
    return m


def global_align(x: list[int], y: list[int]) -> torch.Tensor:
    """Needleman–Wunsch traceback matrix (len(x)+1, len(y)+1) of codes LEFT/UP/DIAG/ORIGIN, with the
    official scores and tie order (left before up before diagonal)."""
    score = torch.zeros(len(x) + 1, len(y) + 1)
    score[0, 1:] = torch.arange(1, len(y) + 1) * GAP
    score[1:, 0] = torch.arange(1, len(x) + 1) * GAP
    trace = torch.zeros(len(x) + 1, len(y) + 1, dtype=torch.int64)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = LEFT, UP, ORIGIN
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = score[i, j - 1] + GAP
            up = score[i - 1, j] + GAP
            diag = score[i - 1, j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            score[i, j] = best
            trace[i, j] = LEFT if best == left else UP if best == up else DIAG
    return trace


def aligned_sources(x: list[int], y: list[int], trace: torch.Tensor) -> list[int]:
    """For every target token in order, its aligned source position, or -1 (no counterpart)."""
    i, j, pairs = len(x), len(y), []
    while i > 0 or j > 0:
        code = int(trace[i, j])
        if code == DIAG:
            i, j = i - 1, j - 1
            pairs.append(i)
        elif code == LEFT:
            j -= 1
            pairs.append(-1)
        elif code == UP:
            i -= 1
        else:
            break
    return pairs[::-1]


def refinement_mapper(source: str, target: str, tokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper (max_len,) int64, alphas (max_len,)) for P2P refine (official ``get_mapper``): the target's
    new map is A_src[..., mapper] · alphas + A_tgt · (1 − alphas). Aligned target tokens take their source
    token's column (alpha 1); tokens without a counterpart keep their own (mapper -1, alpha 0); padding
    after the target's EOS maps to itself."""
    x, y = tokenizer.encode(source), tokenizer.encode(target)
    base = aligned_sources(x, y, global_align(x, y))  # one entry per target token (BOS/EOS included)
    mapper = torch.zeros(max_len, dtype=torch.int64)
    alphas = torch.ones(max_len)
    mapper[: len(base)] = torch.tensor(base)
    alphas[: len(base)] = (torch.tensor(base) != -1).float()
    mapper[len(base):] = len(y) + torch.arange(max_len - len(y))
    return mapper, alphas
