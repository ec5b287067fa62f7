"""Store benchmark: bytes per context token, loading a stored context vs prefilling it again, and
writing / loading through each blob backend (local folder vs an S3 object store on localhost).

Why: the store only pays off if a stored context is much smaller than a plain prefix cache and
much faster to bring back than recomputing it; blobs in an object store let workers on many hosts
share them, at a cost per blob that `--backends` measures. Prints markdown tables (same process,
same model, same thread count for every timing; page cache warm; backends interleaved per repeat).

    python benchmarks/store_bench.py [--tokens 4000] [--haystack DIR] [--threads N]
    PYTHONPATH=. python benchmarks/store_bench.py --backends [--backend-tokens 1000,4000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvstore.compress import compress
from kvstore.config import Settings
from kvstore.decode.cache import CompressedCache
from kvstore.engine.models import load_model
from kvstore.eval.haystack import filler, tokenizer_counter
from kvstore.presses import make_press
from kvstore.presses.base import prefill_context
from kvstore.storage.backends import open_backend
from kvstore.storage.index import ContextIndex
from kvstore.storage.store import ContextMeta, ContextStore, document_sha256

DEFAULT_HAYSTACK = Path("/work/shared/data/haystack")


def timed(run: Callable[[], object], repeats: int, warm_up: bool = True) -> tuple[float, object]:
    """Median seconds over `repeats` runs (after one untimed warm-up run), and the last result."""
    result = run() if warm_up else None
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4000, help="document tokens (before the chat template)")
    parser.add_argument("--ratio", type=float, default=0.75, help="KVzip compression ratio (fraction removed)")
    parser.add_argument("--haystack", type=Path, default=DEFAULT_HAYSTACK, help="folder of .txt essays")
    parser.add_argument("--model", default=None, help="model name (default: the packaged SmolLM2-135M)")
    parser.add_argument("--repeats", type=int, default=5, help="timed loads per stored variant (median)")
    parser.add_argument("--prefill-repeats", type=int, default=2, help="timed prefills (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--backends", action="store_true", help="time writes and loads per backend instead")
    parser.add_argument("--backend-tokens", default="1000,4000", help="document lengths for --backends")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backends:
        backends_main(args)
        return

    start = time.perf_counter()
    loaded = load_model(args.model)
    load_model_s = time.perf_counter() - start
    folder = args.haystack if args.haystack.is_dir() else None  # generated text when the essays are absent
    text = filler(args.tokens, folder, count_tokens=tokenizer_counter(loaded.tokenizer))
    press = make_press("kvzip", args.ratio)
    start = time.perf_counter()
    compressed = compress(loaded, text, press)  # also warms the model up for the prefill timing
    compress_s = time.perf_counter() - start
    prefill_s, run = timed(lambda: prefill_context(loaded, text), args.prefill_repeats, warm_up=False)
    length = run.length

    dtype = compressed.layers[0].keys.dtype
    element = torch.empty((), dtype=dtype).element_size()
    layers, kv_heads = len(compressed.layers), compressed.kv_heads
    head_dim = compressed.head_dim
    full_per_token = layers * kv_heads * head_dim * 2 * element  # what a plain prefix cache holds per token

    meta = ContextMeta.for_model(loaded, press.params(), source="haystack", document_sha256=document_sha256(text))
    rows: list[tuple[str, str, int, float]] = []
    with tempfile.TemporaryDirectory() as home:
        for blob_format, quants in (("safetensors", ("none", "int8", "int4")), ("zarr", ("none", "int4"))):
            # One store per format: ids do not include the format, so one store would dedupe them.
            store = ContextStore.open(Settings(home=Path(home) / blob_format, redis_url=None, blob_format=blob_format))
            try:
                for quant in quants:
                    record, _ = store.put(compressed, meta, quant=quant)

                    def ready(context_id: str = record.id, opened: ContextStore = store) -> CompressedCache:
                        return CompressedCache.from_store(opened, context_id, loaded)

                    load_s, _ = timed(ready, args.repeats)
                    rows.append((quant, record.blob_format, record.bytes, load_s))
            finally:
                store.close()

    print(f"model {loaded.name} ({layers} layers, {kv_heads} KV heads, head_dim {head_dim}, {dtype}), "
          f"{torch.get_num_threads()} CPU threads, model load {load_model_s:.1f} s")  # fmt: skip
    print(f"context: {length} tokens ({length - compressed.prefix_length} document + {compressed.prefix_length} "
          f"template); KVzip ratio {args.ratio}: kept {compressed.kept_pairs} of {compressed.total_pairs} "
          f"pairs (achieved {compressed.achieved_ratio:.3f})\n")  # fmt: skip
    print("| storage | bytes / context token | vs full KV |")
    print("|---|---:|---:|")
    print(f"| full KV (plain prefix cache, {str(dtype).removeprefix('torch.')}) | {full_per_token:,} | 1.00x |")
    names = {"none": f"KVzip {args.ratio}", "int8": f"KVzip {args.ratio} + int8", "int4": f"KVzip {args.ratio} + int4"}
    for quant, blob_format, size, _ in rows:
        per_token = size / length
        print(f"| {names[quant]} ({blob_format}) | {per_token:,.0f} | {full_per_token / per_token:.2f}x smaller |")
    print("(a bfloat16 model, e.g. on GPU, halves the full-KV and unquantized rows; int8/int4 barely change)")
    print("\n| operation | seconds | vs prefill |")
    print("|---|---:|---:|")
    print(f"| prefill {length} tokens (no scoring) | {prefill_s:.3f} | 1x |")
    print(f"| KVzip compress (prefill + scoring) | {compress_s:.3f} | {compress_s / prefill_s:.2f}x slower |")
    for quant, blob_format, _, load_s in rows:
        label = f"load {names[quant]} ({blob_format}) -> CompressedCache"
        print(f"| {label} | {load_s:.4f} | {prefill_s / load_s:.0f}x faster |")


def backends_main(args: argparse.Namespace) -> None:
    """Write and load time per context, local folder vs S3 (a moto server on 127.0.0.1), per format."""
    from tests.s3 import MotoServer  # a real S3-protocol server, as the tests use

    loaded = load_model(args.model)
    folder = args.haystack if args.haystack.is_dir() else None
    # StreamingLLM at the same ratio keeps as many pairs as KVzip (same blob size) without the scoring pass.
    press = make_press("streaming", args.ratio)
    server = MotoServer()
    os.environ.update(server.env())
    print(f"model {loaded.name}, {torch.get_num_threads()} CPU threads, {args.repeats} repeats (median), "
          f"press streaming {args.ratio} (blob size as KVzip {args.ratio}), S3: moto on 127.0.0.1\n")  # fmt: skip
    print(
        "| tokens | format | blob | objects | local write | S3 write | local load | S3 load | S3 extra (write / load) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for tokens in [int(n) for n in args.backend_tokens.split(",")]:
                text = filler(tokens, folder, count_tokens=tokenizer_counter(loaded.tokenizer))
                compressed = compress(loaded, text, press)
                sha = document_sha256(text)
                meta = ContextMeta.for_model(loaded, press.params(), source="haystack", document_sha256=sha)
                for blob_format in ("safetensors", "zarr"):
                    home = Path(tmp) / f"{tokens}-{blob_format}"
                    stores = {
                        "local": ContextStore(home, ContextIndex.open(None, home, "local:v1:")),
                        "s3": ContextStore(
                            home,
                            ContextIndex.open(None, home, "s3:v1:"),
                            backend=open_backend(f"s3://{server.bucket()}/bench", home),
                        ),
                    }
                    times = {(b, op): [] for b in stores for op in ("write", "load")}
                    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
                        for name, store in stores.items():
                            start = time.perf_counter()
                            record, _ = store.put(compressed, meta, blob_format=blob_format)
                            write_s = time.perf_counter() - start
                            start = time.perf_counter()
                            store.load(record.id, loaded.fingerprint, loaded.kv_shape)
                            load_s = time.perf_counter() - start
                            times[name, "write"].append(write_s)
                            times[name, "load"].append(load_s)
                            store.delete(record.id)
                    med = {key: statistics.median(values[1:]) for key, values in times.items()}
                    record, _ = stores["local"].put(compressed, meta, blob_format=blob_format)
                    objects = sum(1 for p in (home / "blobs").rglob("*") if p.is_file()) - 1  # not store.json
                    print(
                        f"| {tokens:,} | {blob_format} | {record.bytes / 2**20:.2f} MiB | {objects} "
                        f"| {med['local', 'write'] * 1e3:.1f} ms | {med['s3', 'write'] * 1e3:.1f} ms "
                        f"| {med['local', 'load'] * 1e3:.1f} ms | {med['s3', 'load'] * 1e3:.1f} ms "
                        f"| +{(med['s3', 'write'] - med['local', 'write']) * 1e3:.1f} / "
                        f"+{(med['s3', 'load'] - med['local', 'load']) * 1e3:.1f} ms |"
                    )
                    for opened in stores.values():
                        opened.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
