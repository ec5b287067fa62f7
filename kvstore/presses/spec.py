"""Press specs, as typed on the command line: "kvzip:0.75" or "kvzip:0.75+streaming:0.5".

A spec is stages joined by "+", each `name:ratio` with ratio in [0, 1) = fraction of the pairs
still present that the stage removes (for `think`, the last stage: fraction of key channels
removed, e.g. "kvzip:0.75+think:0.25"). One stage gives that press, several a `PressChain`.
`name@budget` picks a budget other than the press's default: "kvzip@global:0.9".
"""

from __future__ import annotations

import dataclasses

from kvstore.config import check_ratio
from kvstore.presses.base import Press
from kvstore.presses.chain import PressChain
from kvstore.presses.registry import PRESSES, make_press


def _parse_ratio(text: str, name: str) -> float:
    try:
        return check_ratio(text)
    except ValueError:
        raise ValueError(f"bad ratio {text!r} for press {name!r}: the fraction removed, a number in [0, 1)") from None


def _parse_budget(text: str, name: str, spec: str) -> dict[str, str]:
    accepted = PRESSES[name].budgets
    if text not in accepted:
        raise ValueError(f"unknown budget {text!r} for {name} in spec {spec!r}: choose one of {', '.join(accepted)}")
    return {"budget": text}


def _parse_stage(text: str, spec: str, default_ratio: float | None) -> Press:
    head, colon, ratio_text = (part.strip() for part in text.partition(":"))
    name, at, budget_text = (part.strip() for part in head.partition("@"))
    if not name:
        raise ValueError(f"empty press name in spec {spec!r}: write stages as name:ratio joined by '+'")
    name = name.lower()
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r} in spec {spec!r}: choose one of {', '.join(sorted(PRESSES))}")
    if colon:
        ratio = _parse_ratio(ratio_text, name)
    elif name == "none":
        ratio = 0.0
    elif default_ratio is not None:
        ratio = default_ratio  # a float the press checks itself
    else:
        raise ValueError(f"press {name!r} in spec {spec!r} needs a ratio: write {name}:0.5")
    return make_press(name, ratio, **(_parse_budget(budget_text, name, spec) if at else {}))


def parse_press_spec(spec: str, default_ratio: float | None = None) -> Press:
    """Build the press a spec names; a stage without ":ratio" takes `default_ratio` (if given)."""
    if not spec or not spec.strip():
        raise ValueError("empty press spec: expected e.g. 'kvzip:0.75' or 'kvzip:0.75+streaming:0.5'")
    stages = [_parse_stage(text.strip(), spec, default_ratio) for text in spec.split("+")]
    return stages[0] if len(stages) == 1 else PressChain(stages=tuple(stages))


def press_spec(press: Press) -> str:
    """The spec string of a press or chain (inverse of `parse_press_spec` for default parameters)."""
    if isinstance(press, PressChain):
        return "+".join(press_spec(stage) for stage in press.stages)
    default_budget = next(f.default for f in dataclasses.fields(press) if f.name == "budget")
    budget = f"@{press.budget}" if press.budget != default_budget else ""
    return f"{press.name}{budget}:{press.compression_ratio:g}"
