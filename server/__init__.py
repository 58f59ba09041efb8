"""Quiver's HTTP server: ``create_app(settings)`` and the ``quiver`` command line.

``create_app`` is imported on first use, so that commands which only talk to a server (and
``--help``) start without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
