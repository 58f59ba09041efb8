"""Quiver's HTTP server: ``create_app(settings)`` and the ``quiver`` command line."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
