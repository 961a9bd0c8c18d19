"""``python -m fusionsurgery``."""

from .cli import run

run()
