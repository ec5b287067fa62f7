"""The `kvstore` CLI as a user drives it, on the embedded defaults and the real default model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.main import main
from kvstore.storage.store import ContextStore
from tests.tiny import sample_text

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "docs"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def stored_ids() -> list[str]:
    with ContextStore.open() as store:
        return [record.id for record in store.list()]


def blob_files(home: Path) -> list[Path]:
    """Files in the blob shards (the store's identity file, store.json, is no blob)."""
    blobs = home / "blobs"
    return [p for p in blobs.rglob("*") if p.is_file() and p.parent != blobs] if blobs.exists() else []


@pytest.mark.model
def test_ingest_list_ask_reingest_remove_gc(store_home: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(EXAMPLES, docs)

    ingested = run("ingest", str(docs), "--ratio", "0.5")
    assert ingested.exit_code == 0, ingested.output
    assert len(stored_ids()) == 4

    listing = run("ls")
    assert listing.exit_code == 0 and "lighthouse.md" in listing.output and "4 contexts" in listing.output

    answer = run("ask", str(docs / "lighthouse.md"), "What color is the lighthouse door?")
    assert answer.exit_code == 0 and "green" in answer.output.lower(), answer.output

    found = run("search", "lighthouse door color", "--json")
    assert found.exit_code == 0 and json.loads(found.output)[0]["source"].endswith("lighthouse.md")
    composed = run(
        "ask",
        str(docs / "bakery.txt"),
        "-c",
        str(docs / "lighthouse.md"),
        "What color is the lighthouse door?",
        "--json",
    )
    assert composed.exit_code == 0, composed.output
    [reply] = json.loads(composed.output)
    assert "green" in reply["answer"].lower() and len(reply["contexts"]) == 2  # one answer from both documents
    retrieved = run("ask", "--retrieve", "2", "What color is the lighthouse door?")
    assert retrieved.exit_code == 0 and "green" in retrieved.output.lower() and "lighthouse.md" in retrieved.output

    again = run("ingest", str(docs), "--ratio", "0.5")
    assert again.exit_code == 0 and len(stored_ids()) == 4
    assert "skipped (duplicates) │ 4" in again.output

    shown = run("show", str(docs / "bakery.txt"))
    assert shown.exit_code == 0 and "kept" in shown.output and "smaller" in shown.output

    removed = run("rm", str(docs / "bakery.txt"))
    assert removed.exit_code == 0 and len(stored_ids()) == 3
    assert len(blob_files(store_home)) == 3

    (store_home / "blobs" / "ff").mkdir()
    (store_home / "blobs" / "ff" / ("f" * 64 + ".safetensors")).write_bytes(b"an interrupted blob")
    collected = run("gc", "--grace", "0")
    assert collected.exit_code == 0 and "damaged blobs: 1" in collected.output and "orphan texts: 0" in collected.output
    assert len(blob_files(store_home)) == 3 and len(stored_ids()) == 3

    stats = run("stats")
    assert stats.exit_code == 0 and "contexts: 3" in stats.output


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    latin = tmp_path / "latin.md"
    latin.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"))
    return {
        "empty": (empty, "empty"),
        "binary": (binary, "binary"),
        "undecodable": (latin, "not valid UTF-8"),
        "missing": (tmp_path / "nope.txt", "no such file or directory"),
    }


@pytest.mark.parametrize("case", ["empty", "binary", "undecodable", "missing"])
def test_bad_documents_fail_clearly_and_store_nothing(case: str, store_home: Path, tmp_path: Path) -> None:
    path, message = _bad_files(tmp_path)[case]
    result = CliRunner().invoke(main, ["ingest", str(path)])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert stored_ids() == [] and blob_files(store_home) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--ratio", "1.0"], "is not in [0, 1)"),
        (["--ratio", "-0.1"], "is not in [0, 1)"),
        (["--press", "zip:0.5"], "unknown press 'zip'"),
        (["--redis-url", "redis://127.0.0.1:1"], "cannot reach Redis"),
    ],
)
def test_bad_settings_fail_clearly_and_store_nothing(args: list[str], message: str, store_home: Path) -> None:
    result = CliRunner().invoke(main, ["ingest", str(EXAMPLES / "bakery.txt"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert stored_ids() == [] and blob_files(store_home) == []


def test_the_readme_snippet_and_the_cli_store_a_file_under_one_id(
    store_home: Path, tmp_path: Path, tiny_dir: Path
) -> None:
    from kvstore import KVStore

    doc = tmp_path / "report.md"
    doc.write_text("The archive is in Lyon.\n\nIts keeper is Mara.\n")  # as editors save it: a final newline
    with KVStore(home=tmp_path / "python-store", model=str(tiny_dir)) as kv:  # the README's Python snippet
        [part] = kv.ingest_files([doc])
        [raw] = kv.ingest_text(doc.read_text(), str(doc))  # the text as read, final newline and all
    assert raw.record.id == part.record.id
    ingested = run("ingest", str(doc), "--model", str(tiny_dir))
    assert ingested.exit_code == 0, ingested.output
    assert stored_ids() == [part.record.id]


def test_ask_a_long_document_answers_once_from_its_most_relevant_parts(
    store_home: Path, tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "tiny-640"  # the tiny model with a 640-token window: a few hundred words split into parts
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 640}))
    paragraphs = [sample_text(60, seed=20 + i) for i in range(6)]
    paragraphs[3] += " The lighthouse keeper is called Zebulon."
    monkeypatch.chdir(tmp_path)  # sources are paths as typed: a short one keeps the printed line short
    Path("long.txt").write_text("\n\n".join(paragraphs))
    assert run("ingest", "long.txt", "--model", str(model), "--ratio", "0.5").exit_code == 0
    parts = len(stored_ids())
    ask = ["ask", "long.txt", "Who is the lighthouse keeper Zebulon?", "--model", str(model), "--max-new-tokens", "4"]

    [reply] = json.loads(run(*ask, "--json").output)  # one answer, from the parts that fit the window
    used = reply["sources"]
    assert 0 < len(used) < parts and [s["id"] for s in used] == reply["contexts"]
    assert all(s["source"] == "long.txt" and s["parts"] == parts for s in used)
    assert [s["part"] for s in used] == sorted(s["part"] for s in used)  # in document order

    printed = run(*ask)
    assert printed.exit_code == 0
    named, answer = printed.output.rstrip("\n").split("\n", 1)  # the parts used, then the streamed answer
    assert named == "; ".join(f"long.txt part {s['part'] + 1}/{parts}" for s in used)
    assert answer.strip() == reply["answer"] and "long.txt" not in answer

    retrieve = ["ask", "--retrieve", "2", "Zebulon?", "--model", str(model), "--max-new-tokens", "4"]
    [found] = json.loads(run(*retrieve, "--json").output)  # the sources come with their BM25 scores
    [*_, best] = found["sources"]  # in prompt order: the best match last, next to the question
    assert best["source"] == "long.txt" and best["score"] == max(s["score"] for s in found["sources"]) > 0
    cited = run(*retrieve).output.split("\n", 1)[0]
    assert cited.endswith(f"long.txt part {best['part'] + 1}/{parts} (bm25 {best['score']:.2f}) Zebulon?")


def test_ask_unknown_context_is_a_clear_error(store_home: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "deadbeefcafe", "anything?"])
    assert result.exit_code == 1 and "no stored context for 'deadbeefcafe'" in result.output


def test_every_command_has_help_with_an_example() -> None:
    for command in main.commands:
        result = run(command, "--help")
        assert result.exit_code == 0 and "Example" in result.output, command
