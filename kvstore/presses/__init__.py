"""Press registry: name -> press class, so the CLI, client and workers select presses by name."""

from __future__ import annotations

from kvstore.presses.base import ScorerPress, ScoringInput
from kvstore.presses.kvzip import KVzipPress
from kvstore.presses.noop import NoPress
from kvstore.presses.streaming import StreamingLLMPress

PRESSES: dict[str, type[ScorerPress]] = {cls.name: cls for cls in (KVzipPress, StreamingLLMPress, NoPress)}


def make_press(name: str, ratio: float, **params: object) -> ScorerPress:
    """Build a press by registry name; ratio 0 always means the full cache."""
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}: choose one of {', '.join(sorted(PRESSES))}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (fraction of KV pairs removed), got {ratio}")
    if ratio == 0.0:
        return NoPress()
    return PRESSES[name](compression_ratio=ratio, **params)


__all__ = ["PRESSES", "KVzipPress", "NoPress", "ScorerPress", "ScoringInput", "StreamingLLMPress", "make_press"]
