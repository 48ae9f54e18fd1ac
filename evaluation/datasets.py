"""Prompt-pair benchmarks for text-guided image editing, as one list of :class:`EditExample`.

Supported sources (``load_dataset`` names):

- ``car_fake_edit``, ``imagenet_fake_edit``, ``car_real_edit``, ``imagenet_real_edit``: the JSON files
  published with Free-Prompt-Editing (alibaba/EasyNLP, ``diffusion/FreePromptEditing/datasets/``).
  Each file is a flat list of ``{"soure_prompt", "edit_prompt"[, "image_name"]}`` rows, one row per edit
  pair (the official key is misspelled ``soure_prompt``; ``source_prompt`` is accepted too). Counts:
  756, 1182, 4058, 1092 pairs. The ``*_real_edit`` files name images (``image_name``) resolved under
  ``data.root`` (Stanford-Cars / ImageNet-val folders, not distributed with the JSON).
- ``pnp_ti2i``: a Plug-and-Play TI2I YAML (``init_img``, ``target_prompts`` list, optional
  ``source_prompt``, ``seed``, ``scale``, ``ddim_steps``), one example per target prompt. The file may
  also hold a list of such mappings.
- ``wild_ti2i_real``, ``imagenet_r_ti2i_real``: Plug-and-Play's Wild-TI2I and ImageNet-R-TI2I benchmarks (the
  ``*-real.yaml`` / ``imnetr-ti2i.yaml`` of its TI2I folder) read as ``pnp_ti2i``; ``wild_ti2i_fake``,
  ``imagenet_r_ti2i_fake``: their generated-guidance variants (``wild-ti2i-fake.yaml``, ``imnetr-fake-ti2i.yaml``:
  ``source_prompt``, ``target_prompts``, ``seed``, no image) — the source is generated from the source prompt
  with the entry's seed, as every generated pair here (Table 5's "fake" columns).
- ``pie_bench``: PIE-Bench ``mapping_file.json`` (id → ``image_path``, ``original_prompt``,
  ``editing_prompt`` with ``[brackets]`` around edited words, ``editing_type_id``, ``mask`` as RLE).
  Images are looked up under ``<root>/annotation_images/<image_path>`` (the released layout), falling
  back to ``<root>/<image_path>``.

The toy world's generated pairs (``toy_edit``, ...) are loaded by :mod:`toyworld.edit_benchmark`; every
``configs/data/*.yaml`` names its loader (``_target_``).

Missing images are never dropped silently: every example is kept, and ``LoadedDataset.missing_images``
lists the resolved paths that do not exist (``missing_examples`` counts the examples that use them).
``LoadedDataset.available()`` gives the examples a runner can edit, and ``summary()`` the one line to
report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sdattn.errors import UserError, first_line

FPE_FILES = {
    "car_fake_edit": "Car_fake_edit.json",
    "imagenet_fake_edit": "ImageNet_fake_edit.json",
    "car_real_edit": "Car_real_edit.json",
    "imagenet_real_edit": "ImageNet_real_edit.json",
}
FPE_REAL = {"car_real_edit", "imagenet_real_edit"}
TI2I_SETS = {"wild_ti2i_real": "real", "imagenet_r_ti2i_real": "real",  # Plug-and-Play's TI2I benchmarks:
             "wild_ti2i_fake": "fake", "imagenet_r_ti2i_fake": "fake"}   # image kind of each (Table 5's columns)
DATASET_NAMES = (*FPE_FILES, "pnp_ti2i", *TI2I_SETS, "pie_bench")  # the sets load_dataset reads
SOURCE_KEYS = ("soure_prompt", "source_prompt")  # the official files use the misspelling

# The 28 colours of the official Car_fake_edit.json, in the file's order.
FPE_CAR_COLORS = [
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "brown",
    "beige", "cyan", "magenta", "teal", "lime", "olive", "navy", "maroon", "silver", "gold", "bronze",
    "peach", "coral", "indigo", "violet", "turquoise", "chocolate",
]
PIE_MASK_SIZE = 512


@dataclass(frozen=True)
class EditExample:
    """One edit: ``source_prompt`` → ``target_prompt``; ``image_path`` for real-image edits, else None."""

    id: str
    source_prompt: str
    target_prompt: str
    image_path: str | None = None
    seed: int | None = None
    extra: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class LoadedDataset:
    """Examples of one benchmark plus the image paths (resolved) that do not exist."""

    name: str
    examples: list[EditExample]
    missing_images: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    @property
    def missing_examples(self) -> int:
        """Number of examples whose image is missing (several examples may share one image)."""
        missing = set(self.missing_images)
        return sum(ex.image_path in missing for ex in self.examples)

    def available(self) -> list[EditExample]:
        """Examples that can run: no image needed, or the image exists."""
        missing = set(self.missing_images)
        return [ex for ex in self.examples if ex.image_path is None or ex.image_path not in missing]

    def summary(self) -> str:
        line = f"{self.name}: {len(self.examples)} edit pairs"
        if self.missing_images:
            line += (f"; {self.missing_examples} skipped: {len(self.missing_images)} images missing "
                     f"(first: {self.missing_images[0]})")
        return line


# ----------------------------------------------------------------------------------------- helpers

def read_json(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {str(p)!r} is not valid JSON: {e}") from e


def check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise UserError(f"data.limit {limit!r} must be null or an integer >= 0")
    return limit


def finish_dataset(name: str, examples: list[EditExample], limit: int | None) -> LoadedDataset:
    limit = check_limit(limit)
    if limit is not None:
        examples = examples[:limit]
    missing = sorted({ex.image_path for ex in examples
                      if ex.image_path is not None and not Path(ex.image_path).is_file()})
    return LoadedDataset(name=name, examples=examples, missing_images=missing)


# --------------------------------------------------------------------------------------------- FPE

def load_fpe(path: str | Path, name: str = "fpe", root: str | Path | None = None,
             limit: int | None = None, real: bool | None = None) -> LoadedDataset:
    """One of the Free-Prompt-Editing JSON files. Rows with ``image_name`` need ``root``."""
    rows = read_json(path, "data.path")
    if isinstance(rows, dict):  # tolerate {"data": [...]} or {id: row}
        rows = rows.get("data", list(rows.values()))
    if not isinstance(rows, list):
        raise UserError(f"data.path {str(path)!r}: expected a JSON list of prompt pairs, got "
                        f"{type(rows).__name__}")
    has_images = any(isinstance(r, dict) and "image_name" in r for r in rows)
    if real is None:
        real = has_images
    if real and root is None:
        raise UserError(f"data.root is required for {name} (real images): give the folder holding its "
                        "image_name files")
    examples: list[EditExample] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"data.path {str(path)!r} row {i}: expected an object, got {row!r}")
        src = next((row[k] for k in SOURCE_KEYS if k in row), None)
        targets = row.get("edit_prompt", row.get("target_prompt"))
        if src is None or targets is None:
            raise UserError(f"data.path {str(path)!r} row {i}: needs 'soure_prompt' (or 'source_prompt') "
                            f"and 'edit_prompt'; has {sorted(row)}")
        targets = targets if isinstance(targets, list) else [targets]  # a row may list several targets
        image = row.get("image_name")
        image_path = str(Path(root) / image) if (real and image is not None) else None
        for j, tgt in enumerate(targets):
            ex_id = f"{name}/{i:05d}" if len(targets) == 1 else f"{name}/{i:05d}_{j}"
            extra = {"index": i}
            if image is not None:
                extra["image_name"] = image
            examples.append(EditExample(ex_id, str(src), str(tgt), image_path, None, extra))
    return finish_dataset(name, examples, limit)


def car_fake_edit_pairs(colors: list[str] | None = None) -> list[EditExample]:
    """Rebuild Car-fake-edit pairs: every ordered pair of distinct colours, "a <c1> car" → "a <c2> car".

    Fidelity: the official ``Car_fake_edit.json`` is exactly this construction over its 28 colours
    (:data:`FPE_CAR_COLORS`): sources in colour order, for each source the 27 other colours in colour
    order, article always "a" (the file writes "a orange car"). With the default colour list the result
    equals the official file pair-for-pair and in order (756 = 28·27 pairs); with n colours it has n·(n-1).
    """
    colors = list(FPE_CAR_COLORS if colors is None else colors)
    bad = [c for c in colors if not isinstance(c, str) or not c.strip()]
    if bad or len(set(colors)) != len(colors):
        raise UserError(f"colors {colors!r} must be distinct non-empty strings")
    out = []
    for a in colors:
        for b in colors:
            if a != b:
                out.append(EditExample(f"car_fake_edit/{len(out):05d}", f"a {a} car", f"a {b} car", None,
                                       None, {"index": len(out), "source_color": a, "target_color": b}))
    return out


# ------------------------------------------------------------------------------------- PnP TI2I

def read_ti2i_entries(path: str | Path | None, needs: tuple[str, ...]) -> tuple[Path, list[dict]]:
    """A Plug-and-Play TI2I YAML (one mapping or a list of them), each entry with the keys ``needs``."""
    import yaml

    p = Path(path) if path is not None else None
    if p is None or not p.is_file():
        raise UserError(f"data.path {str(path)!r} does not exist: give a Plug-and-Play TI2I YAML "
                        f"({', '.join(needs)}, ...)")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"data.path {str(p)!r} is not valid YAML: {first_line(e)}") from e
    entries = doc if isinstance(doc, list) else [doc]
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(key not in entry for key in needs):
            raise UserError(f"data.path {str(p)!r} entry {k}: needs {' and '.join(repr(x) for x in needs)}")
    return p, entries


def ti2i_examples(name: str, entries: list[dict], image) -> list[EditExample]:
    """One example per target prompt of each entry; ``image(entry)`` → its image path or None (generated)."""
    examples = []
    for k, entry in enumerate(entries):
        targets = entry["target_prompts"]
        targets = [targets] if isinstance(targets, str) else list(targets)
        seed = entry.get("seed")
        extra_common = {key: entry[key] for key in ("scale", "ddim_steps") if key in entry}
        for j, tgt in enumerate(targets):
            ex_id = f"{name}/{k:03d}_{j:03d}" if len(entries) > 1 else f"{name}/{j:03d}"
            examples.append(EditExample(ex_id, str(entry.get("source_prompt") or ""), str(tgt), image(entry),
                                        None if seed is None else int(seed), {"entry": k, "index": j, **extra_common}))
    return examples


def load_pnp_ti2i(path: str | Path, root: str | Path | None = None, limit: int | None = None,
                  name: str = "pnp_ti2i") -> LoadedDataset:
    """A Plug-and-Play TI2I YAML; relative ``init_img`` resolves under ``root`` (default: the YAML's folder),
    else, as the released benchmark folders are laid out, its file name under ``root/data`` or ``root``."""
    p, entries = read_ti2i_entries(path, ("init_img", "target_prompts"))
    base = Path(root) if root is not None else p.parent

    def image(entry) -> str:
        img = Path(str(entry["init_img"]))
        if img.is_absolute():
            return str(img)
        found = [c for c in (base / img, base / "data" / img.name, base / img.name) if c.is_file()]
        return str(found[0] if found else base / img)

    return finish_dataset(name, ti2i_examples(name, entries, image), limit)


def load_ti2i_prompts(path: str | Path, name: str, limit: int | None = None) -> LoadedDataset:
    """The generated-guidance TI2I sets (Plug-and-Play's ``wild-ti2i-fake.yaml``, ``imnetr-fake-ti2i.yaml``):
    entries {``source_prompt``, ``target_prompts``, ``seed``[, ``scale``, ``ddim_steps``]}, no image; each pair's
    source is generated from its source prompt with the entry's seed (the official sets generated theirs with the
    entry's ``scale`` and ``ddim_steps``, kept in ``extra``; here with the model's, as every generated pair)."""
    _, entries = read_ti2i_entries(path, ("source_prompt", "target_prompts"))
    return finish_dataset(name, ti2i_examples(name, entries, lambda entry: None), limit)


# ------------------------------------------------------------------------------------ PIE-Bench

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def strip_brackets(prompt: str) -> tuple[str, list[str]]:
    """"a [red] car" → ("a red car", ["red"])."""
    words = [w.strip() for w in _BRACKETS.findall(prompt)]
    text = _BRACKETS.sub(lambda m: m.group(1), prompt)
    return re.sub(r"\s+", " ", text).strip(), words


def decode_rle_mask(rle, size: int = PIE_MASK_SIZE, official_border: bool = False) -> np.ndarray:
    """PIE-Bench run-length mask → bool array (size, size).

    ``rle`` is [start, length, start, length, ...] over the row-major flattened image; runs past the end
    are clipped (as the official ``mask_decode``). ``official_border=True`` also sets the outer one-pixel
    border to True, as PIE-Bench's own evaluation code does "to avoid annotation errors in boundary".
    """
    vals = np.asarray(rle if rle is not None else [], dtype=np.int64).ravel()
    if vals.size % 2:
        raise UserError(f"mask RLE has {vals.size} numbers; expected [start, length, ...] pairs (even count)")
    n = size * size
    flat = np.zeros(n, dtype=bool)
    starts, lengths = vals[0::2], vals[1::2]
    if (starts < 0).any() or (lengths < 0).any() or (starts >= n).any():
        raise UserError(f"mask RLE has a start outside [0, {n}) or a negative length")
    for s, ln in zip(starts.tolist(), lengths.tolist()):
        flat[s:min(s + ln, n)] = True
    mask = flat.reshape(size, size)
    if official_border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def load_pie_bench(root: str | Path | None, limit: int | None = None,
                   path: str | Path | None = None) -> LoadedDataset:
    """PIE-Bench: ``<root>/mapping_file.json`` (or ``path``), images under ``<root>/annotation_images``."""
    if root is None and path is None:
        raise UserError("data.root is required for pie_bench: give the folder holding mapping_file.json "
                        "and annotation_images/")
    mapping_path = Path(path) if path is not None else Path(root) / "mapping_file.json"
    base = Path(root) if root is not None else mapping_path.parent
    mapping = read_json(mapping_path, "PIE-Bench mapping file")
    if not isinstance(mapping, dict):
        raise UserError(f"PIE-Bench mapping file {str(mapping_path)!r}: expected an object id → entry")
    examples = []
    for key, entry in mapping.items():
        missing = [k for k in ("image_path", "original_prompt", "editing_prompt") if k not in entry]
        if missing:
            raise UserError(f"PIE-Bench mapping file entry {key!r} lacks {missing}")
        src, src_words = strip_brackets(entry["original_prompt"])
        tgt, tgt_words = strip_brackets(entry["editing_prompt"])
        rel = entry["image_path"]
        img = base / "annotation_images" / rel
        if not img.is_file() and (base / rel).is_file():
            img = base / rel
        extra = {"edited_words": tgt_words, "source_words": src_words,
                 "editing_type_id": entry.get("editing_type_id"), "mask_rle": entry.get("mask"),
                 "editing_prompt_raw": entry["editing_prompt"], "original_prompt_raw": entry["original_prompt"]}
        for k in ("editing_instruction", "blended_word"):
            if k in entry:
                extra[k] = entry[k]
        if entry.get("mask") is not None:  # decoded when an editor asks (Shape-Guided's object mask)
            extra["object_mask"] = partial(decode_rle_mask, entry["mask"])
        examples.append(EditExample(f"pie_bench/{key}", src, tgt, str(img), None, extra))
    return finish_dataset("pie_bench", examples, limit)


def example_mask(example: EditExample, official_border: bool = False) -> np.ndarray | None:
    """The decoded PIE-Bench edit mask of ``example`` (None when it has none)."""
    rle = example.extra.get("mask_rle")
    return None if rle is None else decode_rle_mask(rle, official_border=official_border)


# ------------------------------------------------------------------------------------ entry point

def load_dataset(name: str, root: str | None = None, limit: int | None = None,
                 path: str | None = None) -> LoadedDataset:
    """Load benchmark ``name`` (see :data:`DATASET_NAMES`).

    - FPE names: ``path`` = the official JSON file (required); ``root`` = image folder (required for the
      ``*_real_edit`` sets).
    - ``pnp_ti2i`` and the TI2I sets: ``path`` = the YAML (or ``root`` if it names a .yaml file); ``root`` = image
      folder (real sets).
    - ``pie_bench``: ``root`` = folder with ``mapping_file.json`` (``path`` may name the mapping file).
    """
    if name not in DATASET_NAMES:
        raise UserError(f"data.name {name!r} is not one of {', '.join(DATASET_NAMES)}")
    if name in FPE_FILES:
        if path is None:
            raise UserError(f"data.path is required for {name}: give the FPE file {FPE_FILES[name]} "
                            "(alibaba/EasyNLP diffusion/FreePromptEditing/datasets/)")
        return load_fpe(path, name=name, root=root, limit=limit, real=name in FPE_REAL)
    if name == "pnp_ti2i" or name in TI2I_SETS:
        if path is None and root is not None and str(root).endswith((".yaml", ".yml")):
            path, root = root, None
        if path is None:
            raise UserError(f"data.path is required for {name}: give the Plug-and-Play TI2I YAML")
        if TI2I_SETS.get(name) == "fake":
            return load_ti2i_prompts(path, name, limit=limit)
        return load_pnp_ti2i(path, root=root, limit=limit, name=name)
    return load_pie_bench(root, limit=limit, path=path)
