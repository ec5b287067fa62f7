"""What ingest reports as it goes: the stages of a document part, in order, and the callback type.

Kept apart from ingest (which loads torch) so that progress displays and job status can name the
stages cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

STAGES = ("tokenizing", "prefilling", "scoring", "writing")

# (stage, tokens of that stage done so far): what the engine reports while it works through a part.
Progress = Callable[[str, int], None]


class StageReport(Protocol):
    """Told as each stage of a document part starts and advances: for progress bars and task states.

    `tokens` is the part's context length, `done` the tokens of the current stage done so far.
    """

    def __call__(self, stage: str, *, tokens: int, part: int, parts: int, done: int) -> None: ...
