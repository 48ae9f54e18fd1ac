"""Offline CLIP tokenizers for small models: every vocabulary word is one token.

A real :class:`transformers.CLIPTokenizer` (``vocab.json`` + ``merges.txt``) is written, so the
tokenizer saves and loads with ``save_pretrained`` / ``from_pretrained`` like SD's own. Its BPE
merges build each word left to right from its characters; words are checked to encode to a
single token, so probing can address a word by one position.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank, as the tokenizer does."""
    while len(pieces) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def write_clip_vocab(words: list[str], out_dir: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` in which each of ``words`` is a single token."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    words = sorted({w.lower() for w in words}, key=lambda w: (len(w), w))
    for word in words:
        if not word.isascii() or not word.isalpha():
            raise ValueError(f"vocabulary word {word!r} is not plain ASCII letters")
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(64):  # add merges until every word ends as one token
        changed = False
        for word in words:
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            current = pieces[0]
            for nxt in pieces[1:]:
                ranks.setdefault((current, nxt), len(ranks))
                current, changed = current + nxt, True
        if not changed:
            break
    else:
        raise RuntimeError("could not build single-token merges for the vocabulary")
    merges = sorted(ranks, key=ranks.get)
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab.append(a + b)
    vocab += [BOS, EOS]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return out


def build_word_tokenizer(words: list[str], model_max_length: int, closed: bool = False) -> CLIPTokenizer:
    """A CLIP tokenizer (pad = end-of-text, as SD) where every word of ``words`` is one token.

    ``closed=True`` records ``words`` as the model's whole vocabulary (``closed_vocabulary`` in
    ``tokenizer_config.json``): prompts with other words are then rejected by the sampler instead
    of being split into letters the model never saw.
    """
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_vocab(words, tmp)
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": model_max_length, "pad_token": EOS, "bos_token": BOS,
                        "eos_token": EOS, "unk_token": EOS, "tokenizer_class": "CLIPTokenizer",
                        **({"closed_vocabulary": sorted(set(words))} if closed else {})})
        )
        tok = CLIPTokenizer.from_pretrained(tmp)
    bad = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if bad:
        raise ValueError(f"words {bad} do not encode to a single token")
    return tok
