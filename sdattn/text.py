"""Prompt text shared by the probing prompt families and the toy world's grammar."""

from __future__ import annotations


def article(word: str) -> str:
    """The indefinite article before ``word`` by its first letter: "an" before a vowel, else "a"."""
    return "an" if word[:1].lower() in "aeiou" else "a"
