"""Press registry: name -> press class, so the CLI, client and workers select presses by name."""

from __future__ import annotations

from kvstore.presses.base import ScorerPress, ScoringInput
from kvstore.presses.h2o import H2OPress
from kvstore.presses.kvcompose import KVComposePress
from kvstore.presses.kvzip import KVzipPress
from kvstore.presses.kvzip_head import KVzipHeadPress
from kvstore.presses.noop import NoPress
from kvstore.presses.pyramidkv import PyramidKVPress
from kvstore.presses.snapkv import SnapKVPress
from kvstore.presses.streaming import StreamingLLMPress
from kvstore.presses.think import ThinKPress
from kvstore.presses.tova import TOVAPress

PRESSES: dict[str, type[ScorerPress]] = {
    cls.name: cls
    for cls in (
        KVzipPress,
        StreamingLLMPress,
        NoPress,
        H2OPress,
        SnapKVPress,
        TOVAPress,
        PyramidKVPress,
        KVComposePress,
        KVzipHeadPress,
        ThinKPress,
    )
}


def make_press(name: str, ratio: float, **params: object) -> ScorerPress:
    """Build a press by registry name; ratio 0 always means the full cache."""
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}: choose one of {', '.join(sorted(PRESSES))}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (fraction of KV pairs or key channels removed), got {ratio}")
    if ratio == 0.0:
        return NoPress()
    return PRESSES[name](compression_ratio=ratio, **params)


from kvstore.presses.chain import PressChain  # noqa: E402  (needs the registry above)
from kvstore.presses.spec import parse_press_spec, press_spec  # noqa: E402

__all__ = [
    "PRESSES",
    "H2OPress",
    "KVComposePress",
    "KVzipHeadPress",
    "KVzipPress",
    "NoPress",
    "PressChain",
    "PyramidKVPress",
    "ScorerPress",
    "ScoringInput",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
    "ThinKPress",
    "make_press",
    "parse_press_spec",
    "press_spec",
]
