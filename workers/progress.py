"""Stage reports from inside `kvstore.ingest.ingest_text` without changing it.

`ingest_text` calls the press when a part's prefill starts (`watch_prefill`) and when it is scored
(`keep_masks`), and the store when it writes (`put`); thin proxies around both turn those calls into
progress reports (stage, tokens, part), which the task publishes as its Celery state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

STAGES = ("queued", "tokenizing", "prefilling", "scoring", "writing")

Report = Callable[..., None]


class ReportingPress:
    """Delegates to a press; reports 'prefilling' and 'scoring' for each document part."""

    def __init__(self, press: Any, report: Report):
        self._press = press
        self._report = report
        self._part = -1
        self._tokens = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._press, name)

    def params(self) -> dict[str, object]:
        return self._press.params()

    def watch_prefill(self, prefix_length: int, length: int) -> Any:
        self._part += 1
        self._tokens = length
        self._report("prefilling", tokens=length, part=self._part)
        return self._press.watch_prefill(prefix_length, length)

    def keep_masks(self, run: Any) -> Any:
        self._report("scoring", tokens=self._tokens, part=self._part)
        return self._press.keep_masks(run)


class ReportingStore:
    """Delegates to a ContextStore; reports 'writing' before each part is stored."""

    def __init__(self, store: Any, report: Report):
        self._store = store
        self._report = report

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put(self, compressed: Any, meta: Any, **kwargs: Any) -> Any:
        self._report("writing", tokens=int(compressed.original_length), part=meta.part)
        return self._store.put(compressed, meta, **kwargs)
