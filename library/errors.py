"""Exceptions raised by :mod:`quiver.library`.

Every exception also subclasses the builtin that matches it, so callers that only know the
standard library can still catch it::

    QuiverError (Exception)
    ├── InvalidExpertError (ValueError)      the adapter cannot be served; lists every problem
    │   └── InvalidExpertNameError           the name breaks the naming rule
    ├── ExpertNotFoundError (KeyError)       no expert of that name in the library
    ├── SkillNotFoundError (KeyError)        no demo skill of that name
    ├── ExpertExistsError (FileExistsError)  the name is taken
    ├── LibraryFormatError (ValueError)      the library folder or a stored file is damaged
    └── BaseModelError (OSError)             the base model cannot be found or loaded
"""

from __future__ import annotations

from collections.abc import Sequence


class QuiverError(Exception):
    """Base class of every error raised by the Quiver library."""


class InvalidExpertError(QuiverError, ValueError):
    """An adapter that cannot be added, with every problem found in it.

    ``problems`` contains one line per problem, each naming the module and the values involved.
    """

    def __init__(self, expert: str, problems: Sequence[str]) -> None:
        self.expert = expert
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"expert {expert!r} is invalid ({count} {noun}):\n{lines}")


class InvalidExpertNameError(InvalidExpertError):
    """An expert name that breaks the naming rule."""


class ExpertNotFoundError(QuiverError, KeyError):
    """No expert of the requested name exists in the library."""

    def __init__(self, name: str, available: Sequence[str] = ()) -> None:
        self.name = name
        hint = f"available: {', '.join(sorted(available))}" if available else "the library is empty"
        self.message = f"expert {name!r} not found ({hint})"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes.
        return self.message


class SkillNotFoundError(QuiverError, KeyError):
    """No demo skill of the requested name exists."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.message = f"skill {name!r} not found (available: {', '.join(sorted(available))})"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes.
        return self.message


class ExpertExistsError(QuiverError, FileExistsError):
    """An expert of that name already exists."""

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        super().__init__(
            message or f"expert {name!r} already exists; choose another name, remove it first, or replace it (replace=true in the API, --replace in the CLI)"
        )


class LibraryFormatError(QuiverError, ValueError):
    """A library folder, or a file stored in it, that Quiver cannot read."""


class BaseModelError(QuiverError, OSError):
    """The base model cannot be found or loaded."""
