"""The one table writer of the project (probing tables and benchmark tables alike): a DataFrame →
``<stem>.csv``, ``<stem>.md`` and ``<stem>.tex``, each written atomically."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .files import atomic_write_text

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text (cells are escaped by pandas, captions are not)."""
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def write_table(table: pd.DataFrame, out_dir: str | Path, stem: str, caption: str = "",
                index_label: str = "class") -> dict[str, Path]:
    """Write ``stem.csv``, ``stem.md`` and ``stem.tex`` (rows named ``index_label``); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("csv", "md", "tex")}
    atomic_write_text(paths["csv"], table.to_csv(index_label=index_label))
    atomic_write_text(paths["md"], (f"**{caption}**\n\n" if caption else "") + table.to_markdown() + "\n")
    latex = table.to_latex(caption=latex_escape(caption) or None, label=f"tab:{stem}", escape=True)
    atomic_write_text(paths["tex"], latex)
    return paths
