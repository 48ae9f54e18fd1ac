"""Probe prompt families (data in ``datasets/probe/*.yaml``) → labelled prompts with seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sdattn.errors import UserError
from sdattn.text import article


@dataclass(frozen=True)
class ProbePrompt:
    """One image to generate: its prompt, class label, seed and split."""

    prompt: str
    label: str
    seed: int
    split: str  # "train" or "test"
    words: dict = field(default_factory=dict, compare=False, hash=False)  # placeholder → word used

    @property
    def id(self) -> str:
        return f"{self.prompt}|{self.seed}"


def with_articles(text: str) -> str:
    """Each ``{article}`` → "a"/"an" by the first letter of the word after it."""
    words = text.split()
    for i, w in enumerate(words[:-1]):
        if w == "{article}":
            words[i] = article(words[i + 1])
    return " ".join(words)


def family_file(family: str, data_dir: str | Path) -> Path:
    """The YAML file of a probe's ``family``: a path ending in ``.yaml`` as given, else the shipped family
    ``<data_dir>/probe/<family>.yaml``."""
    return Path(family) if family.endswith(".yaml") else Path(data_dir) / "probe" / f"{family}.yaml"


def load_family(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"prompt family file {str(p)!r} does not exist")
    fam = yaml.safe_load(p.read_text())
    for key in ("template", "classes"):
        if key not in fam:
            raise UserError(f"prompt family {str(p)!r} has no {key!r}")
    return fam


def build_prompts(
    family: dict,
    n_per_class: int,
    test_fraction: float = 0.25,
    classes: list[str] | None = None,
    seed_offset: int = 0,
) -> list[ProbePrompt]:
    """``n_per_class`` images per class from distinct seeds; the last ``test_fraction`` of the
    seeds form the test split (split by seed, so no image appears in both)."""
    all_classes = list(family["classes"])
    classes = list(classes) if classes else all_classes
    unknown = [c for c in classes if c not in all_classes]
    if unknown:
        raise UserError(f"class {unknown[0]!r} is not in family {family.get('name')!r}: allowed {all_classes}")
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction {test_fraction} must be in (0, 1)")
    n_test = max(1, round(n_per_class * test_fraction))
    if n_per_class - n_test < 1:
        raise UserError(f"n_per_class {n_per_class} leaves no training images; use ≥ 2")
    fill = family.get("fill", {}) or {}
    out = []
    for cls in classes:
        for k in range(n_per_class):
            seed = seed_offset + k
            words = {"cls": cls}
            words.update({name: options[k % len(options)] for name, options in fill.items()})
            prompt = with_articles(family["template"].format(article="{article}", **words))
            out.append(ProbePrompt(prompt, cls, seed, "test" if k >= n_per_class - n_test else "train", words))
    return out


def resolve_token(spec: str, prompt: ProbePrompt) -> str:
    """A token spec like ``"{cls}"`` or ``"car"`` → the word it names in this prompt."""
    return spec.format(**prompt.words)
