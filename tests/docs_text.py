"""The manual as the tests read it: a page of docs/ by its name, or the README; and the Python blocks in them."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# the line before a Python block that is not run here says why, or names the test that runs it:
# <!-- not run: the reason -->   or   <!-- run by tests/test_x.py -->
MARKER = re.compile(r"<!-- (not run: \S.*|run by tests/\w+\.py) -->")


def page(name: str) -> str:
    """The text of docs/NAME.md (e.g. "guides/cli"), or of README.md for "README"."""
    path = ROOT / "README.md" if name == "README" else DOCS / f"{name}.md"
    return path.read_text(encoding="utf-8")


def joined(name: str) -> str:
    """The page with its lines joined by single spaces, for phrases that a line break may cut."""
    return " ".join(page(name).split())


def pages() -> list[str]:
    """Every page's name (docs/**/*.md, then the README)."""
    return sorted(
        p.relative_to(DOCS).with_suffix("").as_posix()
        for p in DOCS.rglob("*.md")
        if "reports" not in p.relative_to(DOCS).parts
    ) + ["README"]


def python_blocks(text: str) -> list[tuple[str, str | None]]:
    """Each ```python block of a page (indented ones under a list item too, dedented), in order, with the marker
    on the line before it ("not run: ..." or "run by tests/..."), or None."""
    blocks, lines, previous, i = [], text.splitlines(), "", 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "```python":
            indent = line[: len(line) - len(line.lstrip())]
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```" and lines[j].startswith(indent))
            marker = MARKER.fullmatch(previous.strip())
            blocks.append((textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n", marker.group(1) if marker else None))
            i, previous = end + 1, ""
            continue
        if line.strip():
            previous = line
        i += 1
    return blocks
