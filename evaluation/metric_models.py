"""Loading the models the metrics run on: the CLIP of ``metrics.clip`` (hub id, folder, the shipped
toy-world CLIP, or a seeded tiny random one for smoke runs). The DINO structure model loads in
:mod:`evaluation.structure`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPConfig, CLIPModel

from sdattn.files import REPO_ROOT
from sdattn.fingerprint import source_fingerprint
from sdattn.models import quiet_loading, read_vocab
from sdattn.tokenizer import build_word_tokenizer

from .metrics import DEFAULT_CLIP_MODEL, ClipMetrics

TINY_CLIP = "tiny-random"
TOY_CLIP = "toy"  # the toy world's CLIP shipped in models/toy_clip (trained by toyworld/clip.py)
TOY_CLIP_PATH = REPO_ROOT / "models" / "toy_clip"


def tiny_clip(words: Sequence[str] | None = None, seed: int = 0) -> ClipMetrics:
    """A seeded tiny random CLIP built from config (smoke runs only: its numbers mean nothing)."""
    if words is None:
        words = read_vocab(REPO_ROOT / "datasets" / "tiny_vocab.txt")
    tok = build_word_tokenizer(list(words), model_max_length=77)
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, **ids),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    return ClipMetrics(model, tok)


def load_clip(name: str | None, device=None) -> ClipMetrics:
    """``metrics.clip``: a hub id / folder (ModelLoadError when unavailable), ``toy`` (the shipped
    toy-world CLIP) or ``tiny-random``."""
    source = clip_source(name)
    if source is None:
        clip = tiny_clip()
    else:
        with quiet_loading(source):
            clip = ClipMetrics.from_pretrained(source)
    return clip if device is None else ClipMetrics(clip.model, clip.tokenizer, device=device)


def clip_source(name: str | None) -> str | None:
    """What ``load_clip(name)`` loads from: a hub id or folder (``toy`` = models/toy_clip); None for
    ``tiny-random`` (built in memory)."""
    name = name or DEFAULT_CLIP_MODEL
    if name == TINY_CLIP:
        return None
    return str(TOY_CLIP_PATH) if name == TOY_CLIP else name


def clip_fingerprint(name: str | None) -> str | None:
    """What identifies the weights ``load_clip(name)`` loads (:mod:`sdattn.fingerprint`): a folder (``toy``
    = models/toy_clip) by its contents, a hub id by its cached revision; None for ``tiny-random``, which
    its name and this code's fixed seed identify."""
    source = clip_source(name)
    return None if source is None else source_fingerprint(source, "config.json")
