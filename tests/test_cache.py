"""The request cache packs committed responses into blocks: every response reads back exactly as it was committed,
before and after packing and after reopening; a kill -9 at any point of a repack loses nothing; a cache of an earlier
layout is converted on open, in one transaction a kill cannot tear."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from distillab import cache as cache_module
from distillab.cache import RequestCache, request_key
from distillab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def make_response(i: int) -> tuple[dict, dict]:
    """(request, response) number i, deterministic: codec-shaped top-k of 1-40 tokens over a 32k vocab, some with
    the teacher's tail, some without top-k or token ids, and every 7th one with token strings only (stored as JSON)."""
    rng = random.Random(i)
    n = rng.randint(1, 40)
    request = {"endpoint": "http://x/v1", "model": "teacher", "temperature": 0.0, "prompt": f"describe thing {i}"}
    response = {
        "text": " ".join(rng.choice(["alpha", "beta", "gamma", "δέλτα"]) for _ in range(n)),
        "finish_reason": rng.choice(["stop", "length"]),
        "prompt_tokens": rng.randint(3, 30),
        "completion_tokens": n,
        "token_ids": [rng.randrange(32000) for _ in range(n)],
    }
    if i % 7 == 3:  # an endpoint that gives token strings, not ids: not codec-shaped
        response["top_tokens"] = [["a", "b"]] * n
        response["top_logprobs"] = [[-0.1, -2.5]] * n
        response["token_ids"] = None
    elif i % 5 != 4:
        response["top_ids"] = [rng.sample(range(32000), 20) for _ in range(n)]
        response["top_logprobs"] = [sorted((-rng.random() * 8 for _ in range(20)), reverse=True) for _ in range(n)]
        if i % 3 == 0:
            response["top_tail"] = [-rng.random() * 3 - 3 for _ in range(n)]
    return request, response


def read_all(cache: RequestCache, n: int, start: int = 0) -> list:
    keys = [request_key(make_response(i)[0]) for i in range(start, n)]
    return [(cache.get(k), cache.get(k, raw_topk=True), cache.request(k)) for k in keys]


def put_all(cache: RequestCache, n: int, start: int = 0) -> None:
    for i in range(start, n):
        request, response = make_response(i)
        cache.put(request_key(request), request, response, latency_s=0.25 + i / 1000, attempts=1 + i % 2)


def count(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        db.close()


def test_every_response_reads_back_the_same_before_and_after_packing(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "PACK_ROWS", 32)
    monkeypatch.setattr(cache_module, "BLOCKS_KEPT", 2)  # reads in any order go back to evicted blocks too
    path = tmp_path / "teacher.sqlite"
    cache = RequestCache(path)
    before = []
    for i in range(100):  # each read right after its commit, while it is still a loose row
        put_all(cache, i + 1, start=i)
        before += read_all(cache, i + 1, start=i)
    assert before[3][0]["top_tokens"] == [["a", "b"]] * len(before[3][0]["top_tokens"])  # the JSON-stored kind
    assert before[0][0]["top_ids"] and before[4][0]["top_ids"] is None and before[3][1]["topk"] is None
    assert cache.db.execute("SELECT COUNT(*) FROM loose").fetchone()[0] == 100 - 96  # three blocks of 32
    assert read_all(cache, 100) == before
    shuffled = list(range(100))
    random.Random(0).shuffle(shuffled)
    keys = [request_key(make_response(i)[0]) for i in range(100)]
    assert [cache.get(keys[i]) for i in shuffled] == [before[i][0] for i in shuffled]
    usage = cache.usage(keys)
    assert usage["requests"] == 100 and cache.cached_keys(keys) == set(keys)
    assert usage["completion_tokens"] == sum(make_response(i)[1]["completion_tokens"] for i in range(100))
    assert usage["latency_s"] == pytest.approx(sum(0.25 + i / 1000 for i in range(100)), abs=0.05)
    cache.put(keys[0], *make_response(0))  # asked again (another process): still one row
    cache.close()  # packs the loose rest
    assert count(path, "loose") == 0 and count(path, "packed") == count(path, "responses") == 100
    assert count(path, "blocks") == 4
    db = sqlite3.connect(path)
    assert db.execute("SELECT SUM(attempts) FROM responses").fetchone()[0] == 150  # what other code sums still adds up
    db.close()
    cache = RequestCache(path)
    assert read_all(cache, 100) == before
    cache.close()


KILLED_CHILD = """
import sqlite3, sys, time
from pathlib import Path
from distillab import cache as cache_module
from tests.test_cache import put_all
path, arm, at = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cache_module.PACK_ROWS = 40
armed = []
def stop_at(statement):  # SQLite's own trace of each statement as it starts: stop at `at` once `arm` has run
    armed.append(statement.startswith(arm) or bool(armed and armed[-1]))
    if armed[-1] and statement.startswith(at):
        print("inside", flush=True)
        time.sleep(120)
if arm == "ALTER TABLE":  # a conversion runs inside open: trace the cache's connection from its first statement
    connect = sqlite3.connect
    def traced(*args, **kwargs):
        db = connect(*args, **kwargs)
        db.set_trace_callback(stop_at)
        return db
    sqlite3.connect = traced
cache = cache_module.RequestCache(path)
cache.db.set_trace_callback(stop_at)
put_all(cache, 40)
print("not stopped", flush=True)
"""


def kill_inside(path: Path, arm: str, at: str) -> None:
    """A child opens the cache at `path` and commits 40 responses; SIGKILL where it stops: at the start of the
    statement `at`, once a statement `arm` has run (the sleep is in SQLite's trace hook)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(path), arm, at],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line == "inside\n", (line, child.stderr.read())
        assert path.with_name(path.name + "-wal").exists()  # the write-ahead log (the kill leaves it to recover)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("at", ["INSERT INTO blocks", "INSERT INTO packed", "DELETE FROM loose", "COMMIT"])
def test_a_kill_at_any_point_of_a_repack_loses_nothing(tmp_path, at):
    """The 40th response starts a repack; the kill comes inside it, before its COMMIT is written. Reopened: all 40
    read back exactly."""
    path = tmp_path / "teacher.sqlite"
    kill_inside(path, "BEGIN IMMEDIATE", at)
    assert count(path, "loose") == 40 and count(path, "packed") == 0 and count(path, "blocks") == 0
    cache = RequestCache(path)
    got = read_all(cache, 40)
    assert [g[2] for g in got] == [make_response(i)[0] for i in range(40)]
    assert [(g[0]["text"], g[0]["token_ids"]) for g in got] == [
        (r["text"], r["token_ids"]) for _, r in map(make_response, range(40))
    ]
    cache.close()  # the repack done this time
    assert count(path, "loose") == 0 and count(path, "packed") == 40
    cache = RequestCache(path)
    assert read_all(cache, 40) == got
    cache.close()


# Caches of an earlier layout: one `responses` row a response (and `dictionaries` in user_version 2).
EARLIER_SCHEMA = """
CREATE TABLE responses (key {key} PRIMARY KEY, request {value} NOT NULL, response {value} NOT NULL,
  prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, latency_s REAL NOT NULL, attempts INTEGER NOT NULL,
  created_at REAL NOT NULL);
CREATE TABLE failures (key TEXT PRIMARY KEY, request TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,
  failed_at REAL NOT NULL);
"""
FAILURE = {"key": "ab" * 32, "error": "timed out", "attempts": 3}


def write_earlier_cache(path: Path, kind: str, n: int = 30) -> None:
    """A cache of an earlier layout holding responses 0..n-1 (make_response) and FAILURE. kind: "json" (user_version
    0: hex keys, responses as JSON), "DLR1" (0: hex keys, zstd blobs of response_raw), "dictionary" (2: binary keys,
    DLR2 blobs, responses 10.. and their requests compressed with zstd dictionary 1). A response the codec cannot hold
    is JSON in each."""
    import zstandard as zstd

    pairs = [make_response(i) for i in range(n)]
    raws = []
    for _, response in pairs:
        try:
            raws.append(cache_module.response_raw(response))
        except ValueError:  # token strings, no ids
            raws.append(None)
    binary = kind == "dictionary"
    plain = zstd.ZstdCompressor(level=9, write_checksum=False, write_dict_id=False)
    if binary:
        samples = [json.dumps(request, sort_keys=True).encode() for request, _ in pairs] + [r for r in raws if r]
        dictionary = zstd.train_dictionary(16 * 1024, samples, level=9)
        shared = zstd.ZstdCompressor(level=9, dict_data=dictionary, write_checksum=False, write_dict_id=False)
    db = sqlite3.connect(path)
    db.executescript(EARLIER_SCHEMA.format(key="BLOB" if binary else "TEXT", value="BLOB" if binary else "TEXT"))
    for i, ((request, response), raw) in enumerate(zip(pairs, raws)):
        key, text, stored = request_key(request), json.dumps(request, sort_keys=True), json.dumps(response)
        if kind == "DLR1" and raw:
            stored = b"DLR1" + struct.pack("<I", len(raw)) + plain.compress(raw)
        elif binary and raw and i < 10:
            stored = b"DLR2" + struct.pack("<I", 0) + plain.compress(raw)
        elif binary and raw:
            stored = b"DLR2" + struct.pack("<I", 1) + shared.compress(raw)
            text = b"DLR2" + struct.pack("<I", 1) + shared.compress(text.encode())
        db.execute(
            "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                bytes.fromhex(key) if binary else key,
                text,
                stored,
                response["prompt_tokens"],
                response["completion_tokens"],
                0.25 + i / 1000,
                1 + i % 2,
                1000.0 + i,
            ),
        )
    if binary:
        db.execute("CREATE TABLE dictionaries (id INTEGER PRIMARY KEY, data BLOB NOT NULL, created_at REAL NOT NULL)")
        db.execute("INSERT INTO dictionaries VALUES (1, ?, 0)", (dictionary.as_bytes(),))
    db.execute(
        "INSERT INTO failures VALUES (?, '{}', ?, ?, 0)", (FAILURE["key"], FAILURE["error"], FAILURE["attempts"])
    )
    db.execute(f"PRAGMA user_version = {2 if binary else 0}")
    db.commit()
    db.close()


def expected_reads(tmp_path: Path, kind: str, n: int = 30) -> list:
    """What read_all gives for responses 0..n-1 of an earlier cache of `kind`: a blob reads as the same response
    committed to a cache of this layout; a JSON response as its JSON."""
    if kind == "json":
        loaded = [(json.loads(json.dumps(r)), request) for request, r in map(make_response, range(n))]
        return [(r, r | {"topk": None}, request) for r, request in loaded]
    reference = RequestCache(tmp_path / "reference.sqlite")
    put_all(reference, n)
    try:
        return read_all(reference, n)
    finally:
        reference.close()


def layout_of(path: Path) -> tuple[int, set[str]]:
    db = sqlite3.connect(path)
    try:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        return db.execute("PRAGMA user_version").fetchone()[0], names
    finally:
        db.close()


CURRENT_TABLES = {"loose", "blocks", "packed", "failures", "responses"}


@pytest.mark.parametrize("kind", ["json", "DLR1", "dictionary"])
def test_a_cache_of_an_earlier_layout_is_converted_on_open(tmp_path, kind):
    """Hex or binary keys, JSON, DLR1 blobs or a trained dictionary: opened, the cache holds every response in
    blocks, each reads back as before, its failures are kept, and it grows like any other."""
    path = tmp_path / "teacher.sqlite"
    write_earlier_cache(path, kind)
    expected = expected_reads(tmp_path, kind)
    cache = RequestCache(path)
    assert layout_of(path) == (cache_module.LAYOUT, CURRENT_TABLES)
    assert count(path, "packed") == count(path, "responses") == 30 and count(path, "loose") == 0
    assert read_all(cache, 30) == expected
    keys = [request_key(make_response(i)[0]) for i in range(30)]
    assert cache.cached_keys(keys) == set(keys) and cache.failures() == [FAILURE]
    usage = cache.usage(keys)
    assert usage["requests"] == 30 and usage["latency_s"] == pytest.approx(sum(0.25 + i / 1000 for i in range(30)))
    put_all(cache, 40, start=30)
    grown = read_all(cache, 40, start=30)
    cache.close()
    cache = RequestCache(path)
    assert read_all(cache, 40) == expected + grown and count(path, "responses") == 40
    cache.close()


@pytest.mark.parametrize("at", ["INSERT INTO blocks", "INSERT INTO failures", "DROP TABLE", "COMMIT"])
def test_a_kill_during_a_conversion_loses_nothing(tmp_path, at):
    """The conversion is one transaction: killed inside it, the file keeps its earlier layout; the next open
    converts it."""
    path = tmp_path / "teacher.sqlite"
    write_earlier_cache(path, "dictionary")
    before = layout_of(path)
    kill_inside(path, "ALTER TABLE", at)
    assert layout_of(path) == before == (2, {"responses", "failures", "dictionaries"})
    assert count(path, "responses") == 30
    cache = RequestCache(path)
    assert read_all(cache, 30) == expected_reads(tmp_path, "dictionary") and cache.failures() == [FAILURE]
    cache.close()
    assert layout_of(path) == (cache_module.LAYOUT, CURRENT_TABLES)


def test_a_missing_dictionary_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "teacher.sqlite"
    write_earlier_cache(path, "dictionary")
    db = sqlite3.connect(path)
    db.execute("DELETE FROM dictionaries")
    db.commit()
    db.close()
    with pytest.raises(
        UserError, match=re.escape(f"{path}: unusable teacher cache (a response needs zstd dictionary 1")
    ):
        RequestCache(path)
    assert layout_of(path)[0] == 2  # left as it is


def test_threads_compress_and_decompress_at_once():
    """Shard runs in threads of one process read each other's caches: zstandard's objects are not thread-safe, so
    each thread has its own (a shared decompressor failed with "Destination buffer is too small")."""
    import threading

    from distillab.cache import decode_response, encode_response

    texts = ["".join(random.Random(i).choices("abc ", k=random.Random(i).randint(10, 5000))) for i in range(32)]
    failures: list[Exception] = []

    def round_trips(offset: int) -> None:
        try:
            for i in range(150):
                text = texts[(offset + i) % len(texts)]
                response = {"text": text, "finish_reason": "stop", "prompt_tokens": i, "completion_tokens": len(text)}
                assert decode_response(encode_response(response))["text"] == text
        except Exception as err:  # reported below, with every thread's
            failures.append(err)

    threads = [threading.Thread(target=round_trips, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
