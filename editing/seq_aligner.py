"""Which source token's cross-attention map each target token takes, for Prompt-to-Prompt's edits
(Hertz et al.): the word-level map for prompts with the same number of words ("replace") and a global
token alignment for the others ("refine").

The behaviour is the official one (google/prompt-to-prompt ``seq_aligner.py``, from which the facts are
taken: how tokens are assigned to words, the 1/len weights, the rule after the last changed word, the
alignment scores and their tie order), so that P2P here edits what P2P there edits; the code is ours.

Positions are prompt positions of the padded text-encoder sequence (start token = 0); ``max_len`` is the
text encoder's length (the tokenizer's ``model_max_length``)."""

from __future__ import annotations

import torch

from sdattn.errors import UserError

# Global alignment scores (official ScoreParams(gap=0, match=1, mismatch=-1))
GAP, MATCH, MISMATCH = 0, 1, -1
UNMATCHED = -1  # a target token with no source token


# ------------------------------------------------------------------------------------ words → tokens

def token_spans(text: str, tokenizer) -> list[list[int]]:
    """Prompt positions of the tokens of each word of ``text.split(" ")``, in order.

    Tokens (start and end tokens excluded) are handed to the words one after another: a word takes
    tokens until their decoded characters (word-piece ``#`` stripped) are at least as many as its own.
    Tokens left after the last word belong to none."""
    words = text.split(" ")
    spans: list[list[int]] = [[] for _ in words]
    word, covered = 0, 0
    for position, token in enumerate(tokenizer.encode(text)[1:-1], start=1):
        if word == len(words):
            break
        spans[word].append(position)
        covered += len(tokenizer.decode([token]).strip("#"))
        if covered >= len(words[word]):
            word, covered = word + 1, 0
    return spans


def word_positions(text: str, word: int | str, tokenizer) -> list[int]:
    """Prompt positions of ``word``: the word at that index of ``text.split(" ")``, or every word equal
    to the string (in order); [] when there is none."""
    spans = token_spans(text, tokenizer)
    if isinstance(word, str):
        return [p for w, span in zip(text.split(" "), spans) if w == word for p in span]
    return list(spans[word]) if 0 <= word < len(spans) else []


# -------------------------------------------------------------------------------------------- replace

def replacement_mapper(source: str, target: str, tokenizer, max_len: int) -> torch.Tensor:
    """(max_len, max_len) M, rows = source positions, columns = target positions: the target's new
    cross-attention maps are A_src @ M. For prompts with the same number of words.

    - A word that changes sends its source tokens to its target tokens: one to one when both have as
      many tokens, else every source token to every target token with weight 1/(its target tokens).
    - The tokens before and between changed words map to their counterparts (positions shifted by the
      token-count differences of the changed words so far).
    - After the last changed word the official mapper continues on the diagonal at the *target*
      position (M[q, q]), so when the changed words' token counts differ, the rest of the target reads
      the source tokens at its own positions — the source's end token is skipped or read twice, and
      the last columns stay empty when the target is shorter (kept: it is what P2P edits)."""
    src_words, tgt_words = source.split(" "), target.split(" ")
    if len(src_words) != len(tgt_words):
        raise UserError(f"P2P replace needs prompts with the same number of words: {source!r} has "
                        f"{len(src_words)}, {target!r} has {len(tgt_words)} (use refine)")
    src_spans, tgt_spans = token_spans(source, tokenizer), token_spans(target, tokenizer)
    m = torch.zeros(max_len, max_len)
    shift = 0  # target position − source position of the tokens between changed words
    unmapped = 0  # the first source position not mapped yet
    for k in (k for k, (a, b) in enumerate(zip(src_words, tgt_words)) if a != b):
        s, t = src_spans[k], tgt_spans[k]
        for p in range(unmapped, s[0]):
            m[p, p + shift] = 1.0
        if len(s) == len(t):
            m[s, t] = 1.0
        else:
            m[torch.tensor(s)[:, None], torch.tensor(t)[None, :]] = 1.0 / len(t)
        shift += len(t) - len(s)
        unmapped = s[-1] + 1
    first = unmapped + shift  # the target position after the last changed word
    for q in range(first, first + max_len - max(unmapped, first)):
        m[q, q] = 1.0
    return m


# --------------------------------------------------------------------------------------------- refine

def alignment_scores(x: list[int], y: list[int]) -> list[list[int]]:
    """Needleman–Wunsch: best score of aligning x[:i] with y[:j] for every (i, j); a gap costs ``GAP``, a
    pair ``MATCH`` or ``MISMATCH``."""
    score = [[GAP * (i + j) if i == 0 or j == 0 else 0 for j in range(len(y) + 1)] for i in range(len(x) + 1)]
    for i, a in enumerate(x, start=1):
        for j, b in enumerate(y, start=1):
            score[i][j] = max(score[i][j - 1] + GAP, score[i - 1][j] + GAP,
                              score[i - 1][j - 1] + (MATCH if a == b else MISMATCH))
    return score


def align_target_tokens(x: list[int], y: list[int]) -> list[int]:
    """For every token of ``y`` in order: the index of the ``x`` token it is aligned with, or ``UNMATCHED``.

    Walks back from the full alignment; where several moves give a cell's best score, the official tie
    order decides: a target token left unmatched first, then a source token dropped, then the pair."""
    score = alignment_scores(x, y)
    source_of = [UNMATCHED] * len(y)
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        best = score[i][j]
        if i == 0 or (j > 0 and best == score[i][j - 1] + GAP):
            j -= 1  # y[j] has no source token
        elif j == 0 or best == score[i - 1][j] + GAP:
            i -= 1  # x[i] is not used
        else:
            i, j = i - 1, j - 1
            source_of[j] = i
    return source_of


def refinement_mapper(source: str, target: str, tokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper (max_len,) int64, alphas (max_len,)): the target's new maps are
    A_src[..., mapper]·alphas + A_tgt·(1 − alphas). A target token aligned with a source token (token
    ids, start and end tokens included) takes that token's map (alpha 1); one without keeps its own
    (mapper −1, alpha 0); positions after the target's end token map to themselves (alpha 1)."""
    x, y = tokenizer.encode(source), tokenizer.encode(target)
    aligned = align_target_tokens(x, y)
    mapper = torch.arange(max_len, dtype=torch.int64)
    mapper[: len(y)] = torch.tensor(aligned, dtype=torch.int64)
    alphas = (mapper != UNMATCHED).float()
    return mapper, alphas
