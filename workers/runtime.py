"""One KVStore per worker process, created when the pool process starts and kept for its lifetime.

Loading the model is the expensive part of a worker, so each pool process loads it once (on
`worker_process_init`) and every task reuses it. With several GPUs visible and the device left on
"auto", pool process i takes GPU i (mod the count): one process per GPU.
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init, worker_process_shutdown

from kvstore.client import KVStore
from kvstore.config import Settings

log = logging.getLogger(__name__)

_client: KVStore | None = None
_device: str | None = None  # this pool process's GPU when the worker spreads processes over several


def _device_for(index: int, settings: Settings) -> str | None:
    """A GPU per pool process when several are visible and none was chosen explicitly."""
    if settings.device != "auto":
        return None
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{index % count}" if count > 1 else None


def client() -> KVStore:
    """This process's KVStore, created on first use (a Redis outage then fails the task, which retries)."""
    global _client
    if _client is None:
        _client = KVStore(Settings().with_overrides(device=_device), untrusted_refs=True)  # refs from task messages
    return _client


@worker_process_init.connect
def _start_process(**_: object) -> None:
    global _device
    import torch
    from billiard.process import current_process

    threads = os.environ.get("KVSTORE_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    index = int(getattr(current_process(), "index", 0) or 0)
    _device = _device_for(index, Settings())
    try:
        loaded = client().model()
        log.info("pool process %s loaded %s on %s", index, loaded.name, loaded.device)
    except Exception:  # tasks report the cause (and retry what is transient); the process stays up
        log.exception("could not preload the model")


@worker_process_shutdown.connect
def _stop_process(**_: object) -> None:
    if _client is not None:
        _client.close()
