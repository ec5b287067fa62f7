"""Worker benchmark: documents per minute through the Celery queue with 1 and 2 worker processes,
and the queue's overhead per task compared with ingesting the same documents in-process.

Why: the queue buys scale-out and crash safety; this shows what it costs on one machine. Every run
uses a fresh store home (so nothing is skipped as a duplicate), the embedded Redis, the same
documents and settings, and the same total number of torch threads (the cores split between the
pool processes). Workers are started and warmed up (model loaded) before the clock starts.

    python benchmarks/worker_bench.py [--docs 8] [--chars 1200] [--press kvzip] [--ratio 0.75]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from celery.result import GroupResult

from kvstore.client import KVStore
from kvstore.config import Settings
from kvstore.storage.index import ContextIndex, open_redis
from workers import jobs
from workers.celery import close_app, create_app

DEFAULT_HAYSTACK = Path("/work/shared/data/haystack")
KVSTORE = str(Path(sys.executable).with_name("kvstore"))
_WORDS = "the a of to in essay startup founder idea work money time people good make think users".split()


def documents(count: int, chars: int, folder: Path) -> list[jobs.Document]:
    """`count` distinct documents of about `chars` characters (essays if available, else synthetic prose)."""
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    text = "\n\n".join(p.read_text(errors="replace") for p in files)
    if len(text) < count * chars:
        rng = random.Random(0)
        text = " ".join(rng.choice(_WORDS) for _ in range(count * chars // 4))
    return [jobs.Document(text[i * chars : (i + 1) * chars], f"doc-{i}.txt") for i in range(count)]


def in_process(docs: list[jobs.Document], settings: Settings) -> tuple[float, float]:
    """Seconds to ingest `docs` one after another in this process, then to ingest them again (all duplicates)."""
    with KVStore(settings) as kv:
        kv.model()
        kv.ingest_text("warm-up document.", "warm-up")
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            for doc in docs:
                kv.ingest_text(doc.text, doc.source)
            seconds.append(time.perf_counter() - start)
        return seconds[0], seconds[1]


def through_queue(
    docs: list[jobs.Document], settings: Settings, processes: int, overrides: dict
) -> tuple[float, float]:
    """Seconds from submitting `docs` to the last one done, with one worker of `processes` pool processes;
    then the same for submitting them again (all duplicates: the queue's own cost dominates)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KVSTORE_REDIS_URL", "KVSTORE_BROKER_URL")}
    env |= {
        "KVSTORE_HOME": str(settings.home),
        "KVSTORE_DEVICE": settings.device,
        "KVSTORE_TORCH_THREADS": str(max(1, torch.get_num_threads() // processes)),
    }
    keeper = open_redis(None, settings.home)[0]
    app = create_app(settings)
    worker = subprocess.Popen(
        [KVSTORE, "worker", "-c", str(processes), "-n", f"bench{processes}@%h", "-l", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,  # the banner; failures show up in the job status
        start_new_session=True,
    )
    try:
        warm_up = [jobs.Document(f"warm-up document {i}.", f"warm-up-{i}") for i in range(processes)]
        jobs.wait(app, jobs.submit(app, warm_up, overrides), timeout=600)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            job = GroupResult.restore(jobs.submit(app, docs, overrides), app=app)
            job.join(timeout=3600)  # waits on Redis pub/sub: polling would take CPU from the workers
            seconds.append(time.perf_counter() - start)
        return seconds[0], seconds[1]
    finally:
        worker.terminate()  # warm shutdown: the main process stops its pool itself
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        close_app(app)
        ContextIndex(keeper).close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=8, help="documents per run")
    parser.add_argument("--chars", type=int, default=1200, help="characters per document (~4 per token)")
    parser.add_argument("--press", default=None, help="press (default KVSTORE_PRESS or kvzip)")
    parser.add_argument("--ratio", type=float, default=None, help="fraction of KV pairs removed (default 0.75)")
    parser.add_argument("--haystack", type=Path, default=DEFAULT_HAYSTACK, help="folder of .txt essays")
    args = parser.parse_args()

    base = Settings(device="cpu").with_overrides(press=args.press, ratio=args.ratio)
    overrides = {"press": base.press, "ratio": base.ratio}
    n = args.docs
    docs = documents(n, args.chars, args.haystack)  # every run gets a fresh home: nothing is skipped
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvstore-worker-bench-") as tmp:
        rows.append(("in-process, 1 process", in_process(docs, base.with_overrides(home=Path(tmp) / "inproc"))))
        for processes in (1, 2):
            settings = base.with_overrides(home=Path(tmp) / f"queue{processes}")
            name = f"queue, {processes} worker process{'es' if processes > 1 else ''}"
            rows.append((name, through_queue(docs, settings, processes, overrides)))

    print(
        f"\n{n} documents of ~{args.chars} chars, press {base.press}, ratio {base.ratio}, "
        f"{torch.get_num_threads()} torch threads in all, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| run | seconds | documents / minute | seconds again (all duplicates) |")
    print("|---|---|---|---|")
    for name, (new, again) in rows:
        print(f"| {name} | {new:.1f} | {n / new * 60:.1f} | {again:.2f} |")
    (inproc_new, inproc_again), (queue_new, queue_again) = rows[0][1], rows[1][1]
    print(
        f"\nqueue overhead per task, 1 worker process vs in-process: "
        f"{(queue_again - inproc_again) / n * 1000:.0f} ms measured on duplicates (nothing to compute); "
        f"{(queue_new - inproc_new) / n * 1000:+.0f} ms on new documents "
        f"({inproc_new / n:.2f} s of compute per document)"
    )


if __name__ == "__main__":
    main()
