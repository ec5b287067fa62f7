"""Rich consoles for the CLI: when output is piped or captured, tables get room instead of 80 columns."""

from __future__ import annotations

from rich.console import Console

PIPED_WIDTH = 160


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = max(console.width, PIPED_WIDTH)
    return console
