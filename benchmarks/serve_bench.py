"""Requests/s and time to first token of `kvstore serve` under concurrent OpenAI clients.

    python benchmarks/serve_bench.py --tokens 1000 --clients 1,8,32 --haystack ../shared/data/haystack

Stores 4 contexts, starts a real server (uvicorn, the default model), and for each number of
concurrent clients streams questions with the official `openai` client: all to one context, then
spread over the 4 (each context was asked once before, so these are warm: the first question of
each, which loads its blob, is reported on its own row). Each client asks `--per-client` questions
one after another. Time to first token is from sending the request to the first content chunk. The
baseline is the same questions through the Python client in one process, one after another
(stream, first piece).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from kvstore import KVStore
from kvstore.eval.haystack import filler, tokenizer_counter

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the main point?", "Who is mentioned first?", "What happens at the end?", "Name a place."]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stream_ttft(client: openai.OpenAI, model: str, context: str, question: str, max_tokens: int) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        stream=True,
        extra_body={"contexts": [context]},
    )
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


def _row(label: str, clients: int, ttfts: list[float], seconds: float) -> str:
    rps = len(ttfts) / seconds
    p50, p95 = _percentile(ttfts, 0.5), _percentile(ttfts, 0.95)
    return f"| {label} | {clients} | {len(ttfts)} | {rps:.2f} | {p50 * 1000:.0f} | {p95 * 1000:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000, help="tokens per stored context")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--haystack", default=None)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kvstore-serve-bench-"))
    with KVStore(home=home) as kv:
        count = tokenizer_counter(kv.model().tokenizer)
        ids = [
            kv.ingest_text(filler(args.tokens, args.haystack, seed=200 + i, count_tokens=count), f"doc{i}")[0].record.id
            for i in range(4)
        ]
        baseline = []
        start = time.perf_counter()
        for i in range(8):
            asked, first = time.perf_counter(), None
            for _ in kv.stream(ids[0], QUESTIONS[i % 4], max_new_tokens=args.max_tokens):
                first = first if first is not None else time.perf_counter() - asked
            baseline.append(first if first is not None else time.perf_counter() - asked)
        base_s = time.perf_counter() - start
    env = {**os.environ, "KVSTORE_HOME": str(home)}
    env.pop("KVSTORE_REDIS_URL", None)
    command = [sys.executable, "-c", "from cli.main import main; main()", "serve", "--port", str(args.port)]
    server = subprocess.Popen([*command, "--log-level", "warning"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        start = time.perf_counter()
        cold = [_stream_ttft(client, model, cid, QUESTIONS[0], 2) for cid in ids]  # each context's first load
        cold_s = time.perf_counter() - start
        print("| workload | clients | requests | requests/s | TTFT p50 ms | TTFT p95 ms |")
        print("|---|---|---|---|---|---|")
        print(_row("Python client, in process, one by one", 1, baseline, base_s))
        print(_row("server, first question of each context (blob loaded)", 1, cold, cold_s))
        for clients in [int(c) for c in args.clients.split(",")]:
            for label, contexts in (("one context", ids[:1]), ("mix of 4 contexts", ids)):
                work = [(contexts[i % len(contexts)], QUESTIONS[i % 4]) for i in range(clients * args.per_client)]

                def one_client(n: int, work: list = work, clients: int = clients) -> list[float]:
                    mine = work[n::clients]
                    return [_stream_ttft(client, model, c, q, args.max_tokens) for c, q in mine]

                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    ttfts = [t for result in pool.map(one_client, range(clients)) for t in result]
                print(_row(f"server, {label}", clients, ttfts, time.perf_counter() - start), flush=True)
        print("server stats:", httpx.get(f"{url}/healthz").json())
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
