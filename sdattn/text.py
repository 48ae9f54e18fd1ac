"""Prompt text shared by the probing prompt families, the ablations and the toy world's grammar."""

from __future__ import annotations

from .errors import UserError


def article(word: str) -> str:
    """The indefinite article before ``word`` by its first letter: "an" before a vowel, else "a"."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def word_token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (with the start token at 0) of the tokens of the first occurrence of ``word``.

    A word the tokenizer splits into several tokens gives all of them (capture averages their maps).
    """
    words = prompt.split()
    target = word.lower()
    if target not in [w.lower() for w in words]:
        raise UserError(f"word {word!r} is not in the prompt {prompt!r}; words there: {words}")
    pos = 1  # after the start token
    for w in words:
        n = len(tokenizer(w, add_special_tokens=False).input_ids)
        if w.lower() == target:
            return list(range(pos, pos + n))
        pos += n
    raise AssertionError("unreachable")
