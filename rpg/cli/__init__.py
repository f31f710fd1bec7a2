"""Entry points: the `rpg` command (generate, evaluate, inspect, train) and its user-supplied score functions."""

from rpg.cli.main import main

__all__ = ["main"]
