"""Hostile blobs (issue 15 §1): every crafted header and payload is refused with a BlobError naming the field,
before a tensor is used, in both formats and every quantization, with bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from cli.main import main
from kvstore import KVStore
from kvstore.kv.shape import KVShape
from kvstore.storage.blob import METADATA_KEY, RECORD_KEY, BlobError, BlobHeader, BlobModelError, parse_record
from kvstore.storage.formats import FORMATS, get_format
from kvstore.storage.payload import checksum
from kvstore.storage.store import blob_name
from tests.factories import load_blob
from tests.forge import CASES, SHAPE, Case, first_float, forge
from tests.tiny import sample_text, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TABLE = [
    pytest.param(case, fmt, quant, id=f"{case.name}-{fmt}-{quant}")
    for case in CASES
    for fmt in FORMATS
    for quant in case.quants
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 25 and len(TABLE) >= 150


@pytest.mark.parametrize(("case", "fmt", "quant"), TABLE)
def test_a_crafted_blob_is_refused_naming_the_field(tmp_path: Path, case: Case, fmt: str, quant: str) -> None:
    path = tmp_path / f"forged{FORMATS[fmt]}"
    forge(path, quant, case.mutate, case.pruned)
    with pytest.raises(BlobError) as refused:
        load_blob(path, "fp-a", SHAPE)
    message = str(refused.value)
    assert case.field in message, message
    assert "\n" not in message and len(message) < 400


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_the_same_blob_unedited_loads(tmp_path: Path, fmt: str, quant: str) -> None:
    """The table's refusals come from the edits: the untouched forge passes every check."""
    path = tmp_path / f"clean{FORMATS[fmt]}"
    forge(path, quant, pruned=True)
    compressed, _ = load_blob(path, "fp-a", SHAPE)
    assert compressed.original_length == 80 and compressed.layers[1].key_channels is not None


@pytest.mark.parametrize(
    ("shape", "field"),
    [
        (replace(SHAPE, layers=30), "layers"),
        (replace(SHAPE, kv_heads=4), "kv heads"),
        (replace(SHAPE, head_dim=64), "head_dim"),
        (replace(SHAPE, window=64), "original_length"),
        (replace(SHAPE, vocab=10), "token_ids"),
    ],
)
def test_a_valid_blob_of_another_geometry_is_refused(tmp_path: Path, shape: KVShape, field: str) -> None:
    path = tmp_path / "ctx.safetensors"
    forge(path, "int8")
    with pytest.raises(BlobError, match=field):
        load_blob(path, "fp-a", shape)


def test_a_blob_of_other_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ctx.zarr"
    forge(path, "none", fingerprint="fp-other")
    with pytest.raises(BlobModelError, match="fp-other"):
        load_blob(path, "fp-a", SHAPE)


MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from kvstore.storage.blob import BlobError
from tests.factories import load_blob
from tests.forge import CASES, SHAPE, forge

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def refuse(path):
    try:
        load_blob(path, "fp-a", SHAPE)
    except BlobError as exc:
        return str(exc)
    return None

home = Path(sys.argv[1])
forge(home / "warm.zarr", "int8")
load_blob(home / "warm.zarr", "fp-a", SHAPE)  # every code path imported and warmed up once
before, refusals = peak_mib(), []
big = [c for c in CASES if c.name.startswith("lengths summing") or "10^9" in c.name]
for i, case in enumerate(big):
    for suffix in (".safetensors", ".zarr"):
        for quant in case.quants:
            path = home / f"case{i}-{quant}{suffix}"
            forge(path, quant, case.mutate, case.pruned)
            refusals.append(refuse(path))
huge = home / "huge.zarr"  # header intact, one array's own metadata declaring 2^31 elements
forge(huge, "int4")
meta_path = huge / "layer.0" / "positions" / "zarr.json"
meta = json.loads(meta_path.read_text())
meta["shape"] = meta["chunk_grid"]["configuration"]["chunk_shape"] = [1 << 31]
meta_path.write_text(json.dumps(meta))
refusals.append(refuse(huge))
print(json.dumps({"refusals": refusals, "grew_mib": peak_mib() - before}))
"""


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_float16_scales_that_dequantize_beyond_float16_are_refused(tmp_path: Path, fmt: str, quant: str) -> None:
    """Scales finite in float16 (60,000) whose codes multiply them past its range: refused, not answered as inf."""
    path = tmp_path / f"forged{FORMATS[fmt]}"
    forge(path, quant, first_float("keys.scales", 60000.0), dtype=torch.float16)
    with pytest.raises(BlobError, match="dequantizes to values beyond float16 \\(scales\\)"):
        load_blob(path, "fp-a", SHAPE)
    clean = tmp_path / f"clean{FORMATS[fmt]}"
    forge(clean, quant, dtype=torch.float16)  # the same blob unedited loads
    assert load_blob(clean, "fp-a", SHAPE)[0].finite


def test_refusing_huge_declarations_allocates_nothing_like_them(tmp_path: Path) -> None:
    """Lengths of 2^22-2^40 rows, group size 10^9, a zarr array declared at 2^31 elements: refused in a
    fresh process whose peak memory barely moves (the audit saw +0.7-3 GB and a 51 GB attempt)."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["refusals"]) == 5 * 6 + 1 and all(result["refusals"]), result
    assert "layer.0.positions" in result["refusals"][-1]
    assert result["grew_mib"] < 64, result


def test_ask_on_a_crafted_blob_under_a_patched_record_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: a stored context's blob re-sealed with lying positions and its record's checksum patched
    (what anyone who can write the store and the shared Redis can do): `kvstore ask` refuses it in one line."""
    tiny = tiny_model("llama")
    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    monkeypatch.setenv("KVSTORE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KVSTORE_MODEL", str(model_dir))
    monkeypatch.delenv("KVSTORE_REDIS_URL", raising=False)
    with KVStore(press="streaming", ratio=0.5) as kv:
        record = kv.ingest_text(sample_text(60, seed=5), "doc.txt")[0].record
        path = tmp_path / "home" / "blobs" / blob_name(record.id, "safetensors")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        positions = tensors["layer.1.positions"].clone()
        positions[[2, 3]] = positions[[3, 2]]
        tensors["layer.1.positions"] = positions
        header = BlobHeader.from_json(metadata[METADATA_KEY])
        sealed = replace(header, checksum=checksum(header, tensors))
        path.unlink()
        path.write_bytes(get_format("safetensors").pack(tensors, sealed, parse_record(metadata[RECORD_KEY]))[""])
        kv.store.index.client.hset(kv.store.index._ctx(record.id), mapping={"checksum": sealed.checksum})
    result = CliRunner().invoke(main, ["ask", record.id[:12], "What is the secret?"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "positions" in lines[0] and "Traceback" not in result.output, result.output
