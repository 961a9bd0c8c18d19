"""The command-line interface: a thin Typer layer over the Python API."""

from .app import app, main, run

__all__ = ["app", "main", "run"]
