"""Keep each benchmark's section of docs/benchmarks.md, so that one script's rerun leaves the others' results alone."""

from __future__ import annotations

from pathlib import Path

PAGE_TITLE = "# Benchmarks"


def write_section(path: Path, name: str, lines: list[str]) -> None:
    """Replace the section called ``name`` of the Markdown page at ``path`` with ``lines``, or append it.

    A section lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` comment lines.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = "\n".join([start, *lines, end])
    text = path.read_text() if path.exists() else PAGE_TITLE + "\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
