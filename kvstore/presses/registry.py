"""Press registry: name -> press class, so the CLI, client and workers select presses by name.

Each press module registers its class with `@register`; importing `kvstore.presses` imports them all.
"""

from __future__ import annotations

from typing import TypeVar

from kvstore.presses.base import Press

PRESSES: dict[str, type[Press]] = {}
P = TypeVar("P", bound=type[Press])


def register(cls: P) -> P:
    PRESSES[cls.name] = cls
    return cls


def make_press(name: str, ratio: float, **params: object) -> Press:
    """Build a press by registry name; ratio 0 always means the full cache."""
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}: choose one of {', '.join(sorted(PRESSES))}")
    if ratio == 0.0:
        return PRESSES["none"]()
    return PRESSES[name](compression_ratio=ratio, **params)
