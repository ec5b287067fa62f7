"""Scoring policies, one small file each, registered by name (`kvstore.presses.registry`)."""

from __future__ import annotations

from kvstore.presses.base import ChannelPress, Press, ScoringInput, TokenPress
from kvstore.presses.chain import PressChain
from kvstore.presses.h2o import H2OPress
from kvstore.presses.kvcompose import KVComposePress
from kvstore.presses.kvzip import KVzipPress
from kvstore.presses.kvzip_head import KVzipHeadPress
from kvstore.presses.noop import NoPress
from kvstore.presses.pyramidkv import PyramidKVPress
from kvstore.presses.registry import PRESSES, make_press
from kvstore.presses.snapkv import SnapKVPress
from kvstore.presses.spec import parse_press_spec, press_spec
from kvstore.presses.streaming import StreamingLLMPress
from kvstore.presses.think import ThinKPress
from kvstore.presses.tova import TOVAPress

__all__ = [
    "PRESSES",
    "ChannelPress",
    "H2OPress",
    "KVComposePress",
    "KVzipHeadPress",
    "KVzipPress",
    "NoPress",
    "Press",
    "PressChain",
    "PyramidKVPress",
    "ScoringInput",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
    "ThinKPress",
    "TokenPress",
    "make_press",
    "parse_press_spec",
    "press_spec",
]
