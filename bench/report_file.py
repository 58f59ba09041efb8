"""Helpers shared by the benchmark scripts: the machine and command they report, and their section of docs/benchmarks.md.

Each script rewrites only its own section of the page, so that one script's rerun leaves the
others' results alone.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent

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


def cpu_model() -> str:
    """Return the first ``model name`` of /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """Return the CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def exact_command() -> str:
    """Return the command line of this run, with paths inside the repository made relative."""

    def shown(path: str) -> str:
        absolute = Path(path).absolute()
        if absolute.is_relative_to(REPOSITORY):
            return str(absolute.relative_to(REPOSITORY))
        return path

    return shlex.join([shown(sys.executable), shown(sys.argv[0]), *sys.argv[1:]])
